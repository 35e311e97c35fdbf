//go:build linux

package kube_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// TestAgentKill9UnderClusterIPTraffic kills the client node's agent with SIGKILL while
// established connections through a ClusterIP carry echoes and a dialer opens new ones
// back to back, then restarts it. No established flow may break (the programs and pinned
// maps outlive the agent); the new-connection gap (the longest time between two successful
// new connections around the kill) and the failed new connections are reported, for the
// chaos table in docs/reliability.md.
func TestAgentKill9UnderClusterIPTraffic(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	client, addr := echoService(t, ctx, l, "e2e-chaos")
	ld := startLoad(t, ctx, client, addr, 20)

	n, err := l.NodeByName("node-2")
	if err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	if err := n.KillAgent(); err != nil {
		t.Fatal(err)
	}
	if err := n.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	ready := time.Now()
	// And after the restart, until the dialer has succeeded 50 more times.
	ld.waitNewConns(t, ready, 50, "new connections after the restart")
	r := ld.finish(killed)
	t.Logf("agent of node-2 killed (-9) and ready again after %v; %v", ready.Sub(killed).Round(time.Millisecond), r)
	requireNoBrokenFlows(t, r)
}

// TestControlPlaneRestartsUnderClusterIPTraffic restarts kube-apiserver, then etcd, while
// established flows and new connections run through a ClusterIP. The datapath does not
// depend on the control plane, so no flow may break and no new connection may fail; right
// after each restart a new Service is created, and the time until it is in both nodes' maps
// says the agents' informers recovered (the test fails if they did not within a minute).
func TestControlPlaneRestartsUnderClusterIPTraffic(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	const ns = "e2e-chaos-cp"
	client, addr := echoService(t, ctx, l, ns)
	backends := []string{netip.AddrPortFrom(l.Pod(ns, "echo-1").IP, 7000).String(), netip.AddrPortFrom(l.Pod(ns, "echo-2").IP, 7000).String()}
	for i, step := range []struct {
		name    string
		restart func(context.Context) error
	}{
		{"kube-apiserver", l.ControlPlane().RestartAPIServer},
		{"etcd", l.ControlPlane().RestartEtcd},
	} {
		t.Run(step.name, func(t *testing.T) {
			logs, failedReqs := map[string]int64{}, map[string]float64{}
			for _, n := range l.Nodes() {
				logs[n.Name] = fileSize(t, n.AgentLog())
				failedReqs[n.Name] = agentMetric(t, ctx, n, "tern_kubernetes_api_requests_total", `result="unreachable"`) +
					agentMetric(t, ctx, n, "tern_kubernetes_api_requests_total", `result="server_error"`)
			}
			ld := startLoad(t, ctx, client, addr, 20)
			// What monitoring of the control plane sees meanwhile: its /readyz.
			notReady := make(chan string, 1)
			pollDone := make(chan struct{})
			pollCtx, stopPoll := context.WithCancel(ctx)
			go func() {
				defer close(pollDone)
				for pollCtx.Err() == nil {
					body, err := l.Client().Discovery().RESTClient().Get().AbsPath("/readyz").Do(pollCtx).Raw()
					if err != nil && pollCtx.Err() == nil {
						select {
						case notReady <- fmt.Sprintf("%v %s", err, body):
						default:
						}
					}
					time.Sleep(20 * time.Millisecond) // a poll interval, not a synchronisation
				}
			}()
			stopped := time.Now()
			err := step.restart(ctx)
			stopPoll()
			<-pollDone
			if err != nil {
				t.Fatal(err)
			}
			back := time.Now()
			select {
			case why := <-notReady:
				t.Logf("the apiserver's /readyz failed during the restart: %.200s", why)
			default:
				t.Errorf("the apiserver's /readyz never failed while %s restarted: the outage was not visible to control-plane monitoring", step.name)
			}
			// The change right after: a second Service on the same backends.
			svc, err := l.Client().CoreV1().Services(ns).Create(ctx, &corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("after-%d", i)},
				Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "echo"}, Ports: []corev1.ServicePort{
					{Port: 7100, TargetPort: intstr.FromString("serve"), Protocol: corev1.ProtocolTCP}}},
			}, metav1.CreateOptions{})
			if err != nil {
				t.Fatalf("create a Service right after the %s restart: %v", step.name, err)
			}
			created := time.Now()
			front := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 7100)
			onEveryNode(t, l, front, "TCP", backends)
			inMaps := time.Now()
			if who, err := client.Ask(ctx, front.String(), "after"); err != nil || !strings.HasPrefix(who, ns+"/echo-") {
				t.Fatalf("the Service created after the restart: %q, %v", who, err)
			}
			ld.waitNewConns(t, inMaps, 20, "new connections after the Service change")
			r := ld.finish(stopped)
			t.Logf("%s restarted (stopped, then ready) in %v; a Service created %v later was in both nodes' maps %v after its creation (%v after the stop); %v",
				step.name, back.Sub(stopped).Round(time.Millisecond), created.Sub(back).Round(time.Millisecond),
				inMaps.Sub(created).Round(time.Millisecond), inMaps.Sub(stopped).Round(time.Millisecond), r)
			requireNoBrokenFlows(t, r)
			if r.Failed > 0 {
				t.Errorf("%d new connections through %s failed while %s restarted: the datapath must not depend on the control plane", r.Failed, addr, step.name)
			}
			// The agents: a kube-apiserver restart reaches them (their watches end and
			// reconnecting is refused), so each must count it and log it going and coming
			// back. An etcd restart need not: the apiserver serves watches from its cache.
			for _, n := range l.Nodes() {
				failed := agentMetric(t, ctx, n, "tern_kubernetes_api_requests_total", `result="unreachable"`) +
					agentMetric(t, ctx, n, "tern_kubernetes_api_requests_total", `result="server_error"`) - failedReqs[n.Name]
				gone := logLinesSince(t, n.AgentLog(), logs[n.Name], "apiserver does not answer")
				again := logLinesSince(t, n.AgentLog(), logs[n.Name], "apiserver answers again")
				t.Logf("%s's agent: %v failed apiserver requests counted; logged: %v / %v", n.Name, failed, first(gone), first(again))
				if step.name == "kube-apiserver" && (failed == 0 || len(gone) == 0 || len(again) == 0) {
					t.Errorf("%s's agent did not surface the apiserver restart: %v failed requests counted, %d warnings, %d recoveries logged",
						n.Name, failed, len(gone), len(again))
				}
			}
		})
	}
}

// fileSize is path's size now, to read what is appended later (logLinesSince).
func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// logLinesSince returns the lines appended to path after offset that contain any of words.
func logLinesSince(t *testing.T, path string, offset int64, words ...string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if offset > int64(len(b)) {
		offset = 0
	}
	var out []string
	for _, line := range strings.Split(string(b[offset:]), "\n") {
		for _, w := range words {
			if strings.Contains(line, w) {
				out = append(out, line)
				break
			}
		}
	}
	return out
}

func first(lines []string) string {
	if len(lines) == 0 {
		return "(none)"
	}
	return lines[0]
}
