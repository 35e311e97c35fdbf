//go:build linux

package kube_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/lab"
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

// TestCloudFaultsUnderTrafficAndPodChurn makes the cloud misbehave while a ClusterIP carries
// established flows and new connections and pods come and go on both nodes: 15 % of OpenAPI
// calls answer Throttling and 15 % InternalError, latency spikes of 400 ms come and go, and
// DescribeNetworkInterfaces lags behind the calls that change ENIs (lab.LaggingListing). No
// established flow may break, no address may be given twice, every injected error must show
// in the agents' tern_cloud_api_calls_total, and once the faults stop the cloud and the
// agents must agree (nothing leaked) without help; the time that takes is reported.
func TestCloudFaultsUnderTrafficAndPodChurn(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	const ns = "e2e-chaos-cloud"
	client, addr := echoService(t, ctx, l, ns)
	emu := l.Emulator()
	codes := []string{ecsemu.CodeThrottling, ecsemu.CodeInternalError}
	counted := func() map[string]float64 {
		out := map[string]float64{}
		for _, n := range l.Nodes() {
			for _, c := range codes {
				out[c] += agentMetric(t, ctx, n, "tern_cloud_api_calls_total", `result="`+c+`"`)
			}
		}
		return out
	}
	snap := emu.Snapshot()
	before, injectedBefore, callsBefore := counted(), snap.Errors, sum(snap.Calls)
	ld := startLoad(t, ctx, client, addr, 20)

	faultsOn := time.Now()
	calm := func() {
		emu.ClearFaults()
		emu.SetLatency(0)
		emu.SetListingLag(ecsemu.ListingLag{})
	}
	t.Cleanup(calm) // the lab is shared: never leave a fault behind
	emu.SetListingLag(lab.LaggingListing)
	for _, c := range codes {
		emu.InjectFault(ecsemu.Fault{Code: c, Rate: 0.15})
	}
	spikes := make(chan struct{})
	spikesDone := make(chan struct{})
	go func() {
		defer close(spikesDone)
		for on := true; ; on = !on {
			d := 700 * time.Millisecond
			if on {
				emu.SetLatency(400 * time.Millisecond)
				d = 300 * time.Millisecond
			} else {
				emu.SetLatency(0)
			}
			select { // the fault schedule, not a synchronisation
			case <-spikes:
				return
			case <-time.After(d):
			}
		}
	}()

	// Churn: two rounds of 10 pods per node, created 5 at a time and then deleted. The
	// pool (4 warm, at most 12 idle) must assign addresses for them and give some back.
	ads := 0
	for round := range 2 {
		var pods []*lab.Pod
		var mu sync.Mutex
		var wg sync.WaitGroup
		errs := make(chan error, 20)
		work := make(chan lab.PodSpec)
		for range 5 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for s := range work {
					pctx, pcancel := context.WithTimeout(ctx, time.Minute)
					p, err := l.RunPod(pctx, s)
					pcancel()
					if err != nil {
						errs <- err
						continue
					}
					mu.Lock()
					pods = append(pods, p)
					mu.Unlock()
				}
			}()
		}
		for i := range 20 {
			work <- lab.PodSpec{Namespace: ns, Name: fmt.Sprintf("churn-%d-%d", round, i), Node: fmt.Sprintf("node-%d", i%2+1),
				Labels: map[string]string{"app": "churn"}}
		}
		close(work)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Errorf("a pod could not start under cloud faults (the kubelet-style retry ran until its minute was up): %v", err)
		}
		seen := map[netip.Addr]string{}
		for _, p := range l.Pods() {
			if prev, dup := seen[p.IP]; dup {
				t.Fatalf("address %s given twice: %s and %s", p.IP, prev, p.Key())
			}
			seen[p.IP] = p.Key()
		}
		for _, p := range pods {
			ads += p.Attempts
			if err := l.DeletePod(ctx, p); err != nil {
				t.Fatalf("delete %s under cloud faults: %v", p.Key(), err)
			}
		}
	}
	close(spikes)
	<-spikesDone
	calm()
	faultsOff := time.Now()
	snap = emu.Snapshot()
	injected, calls := snap.Errors, sum(snap.Calls)-callsBefore
	eventually(t, 60*time.Second, "cloud and agents agree after the faults stopped", func() (bool, string) {
		err := l.CheckCloudMatchesAgents(ctx)
		if err != nil {
			return false, err.Error()
		}
		return true, ""
	})
	settled := time.Now()
	ld.waitNewConns(t, settled, 20, "new connections after the faults")
	r := ld.finish(faultsOn)
	after := counted()
	t.Logf("cloud faults for %v (%d OpenAPI calls) while 40 pods were created (%d CNI ADDs) and deleted; cloud and agents agreed %v after the faults stopped; %v",
		faultsOff.Sub(faultsOn).Round(time.Millisecond), calls, ads, settled.Sub(faultsOff).Round(time.Millisecond), r)
	for _, c := range codes {
		inj, seen := injected[c]-injectedBefore[c], after[c]-before[c]
		t.Logf("%s: the emulator answered %d, the agents counted %v in tern_cloud_api_calls_total", c, inj, seen)
		if inj == 0 {
			t.Errorf("no %s was injected: the churn did not reach the cloud", c)
		}
		if seen != float64(inj) {
			t.Errorf("%s: the emulator answered %d, the agents' tern_cloud_api_calls_total counted %v", c, inj, seen)
		}
	}
	requireNoBrokenFlows(t, r)
	if r.Failed > 0 {
		t.Errorf("%d new connections through %s failed during cloud faults: the datapath does not need the cloud", r.Failed, addr)
	}
}

func sum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// TestPodNetnsDeletedUnderTraffic destroys a pod's network namespace under the agent with no
// CNI DEL, as when the container runtime dies with its sandboxes, while a ClusterIP carries
// traffic on the same node. The kernel takes the veth pair with the namespace; the agent
// still holds the pod's address, its endpoint record and its ipcache entry as a local pod.
// The runtime then comes back and runs CNI GC through libcni with the sandboxes it still has:
// libcni first runs DEL (with the dead namespace's path) for every cached attachment that is
// not valid, then the plugin's GC. (tern's own pod GC releases the address too once the Pod
// object is deleted, after two of its 1-minute passes: not waited for here.) The address must
// go back to the pool and the endpoint record with it, counted
// (tern_agent_vanished_endpoints_total) and logged, and no other flow may notice.
func TestPodNetnsDeletedUnderTraffic(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const ns = "e2e-chaos-netns"
	client, addr := echoService(t, ctx, l, ns)
	n, err := l.NodeByName("node-2")
	if err != nil {
		t.Fatal(err)
	}
	victim, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "victim", Node: n.Name})
	if err != nil {
		t.Fatal(err)
	}
	hostVeth := api.HostVethName(victim.ContainerID, "eth0")
	if !linkExists(t, n, hostVeth) || !endpointRecorded(t, n, victim.IP) {
		t.Fatalf("before the fault: host veth %s present %v, endpoint of %s recorded %v", hostVeth,
			linkExists(t, n, hostVeth), victim.IP, endpointRecorded(t, n, victim.IP))
	}
	vanished := agentMetric(t, ctx, n, "tern_agent_vanished_endpoints_total")
	logAt := fileSize(t, n.AgentLog())
	ld := startLoad(t, ctx, client, addr, 20)

	gone := time.Now()
	l.Forget(victim) // the namespace's last reference: the kernel destroys it and the veth pair
	eventually(t, 30*time.Second, "the host veth gone with the pod's namespace", func() (bool, string) {
		return !linkExists(t, n, hostVeth), hostVeth + " still there"
	})
	if !endpointRecorded(t, n, victim.IP) || !allocated(t, ctx, n, victim.IP) {
		t.Fatalf("with the namespace gone and no DEL, the agent should still hold %s (the fault this test is about): endpoint %v, allocation %v",
			victim.IP, endpointRecorded(t, n, victim.IP), allocated(t, ctx, n, victim.IP))
	}
	if err := l.GC(ctx); err != nil {
		t.Fatalf("CNI GC after the pod's namespace vanished: %v", err)
	}
	cleaned := time.Now()
	if allocated(t, ctx, n, victim.IP) {
		t.Errorf("after GC the agent still allocates %s", victim.IP)
	}
	if endpointRecorded(t, n, victim.IP) {
		t.Errorf("after GC the endpoint map or the ipcache still has %s as a local pod", victim.IP)
	}
	if d := agentMetric(t, ctx, n, "tern_agent_vanished_endpoints_total") - vanished; d != 1 {
		t.Errorf("tern_agent_vanished_endpoints_total rose by %v, want 1", d)
	}
	if lines := logLinesSince(t, n.AgentLog(), logAt, "forgot the endpoint of a pod whose interface vanished"); len(lines) == 0 || !strings.Contains(lines[0], `"`+victim.IP.String()+`"`) {
		t.Errorf("the agent did not log forgetting the endpoint of %s", victim.IP)
	} else {
		t.Logf("agent log: %s", lines[0])
	}
	if err := l.CheckCloudMatchesAgents(ctx); err != nil {
		t.Errorf("after GC: %v", err)
	}
	// The kubelet deletes the Pod object; the address serves the next pod.
	if err := l.Client().CoreV1().Pods(ns).Delete(ctx, victim.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	next, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "next", Node: n.Name, ServePort: 7000})
	if err != nil {
		t.Fatalf("a pod after GC: %v", err)
	}
	if who, err := client.Ask(ctx, netip.AddrPortFrom(next.IP, 7000).String(), "hi"); err != nil || who != ns+"/next" {
		t.Fatalf("the next pod on %s (%s) from the client: %q, %v", n.Name, next.IP, who, err)
	}
	ld.waitNewConns(t, time.Now(), 20, "new connections after GC")
	r := ld.finish(gone)
	t.Logf("pod namespace destroyed without DEL; veth gone with it, CNI GC released %s and its endpoint %v after the namespace went; next pod got %s; %v",
		victim.IP, cleaned.Sub(gone).Round(time.Millisecond), next.IP, r)
	requireNoBrokenFlows(t, r)
	if r.Failed > 0 {
		t.Errorf("%d new connections through %s failed", r.Failed, addr)
	}
}

// linkExists reports whether the node's namespace has a link named name.
func linkExists(t *testing.T, n *lab.Node, name string) bool {
	t.Helper()
	found := false
	if err := nsutil.Do(n.NS, func() error {
		_, err := netlink.LinkByName(name)
		if err == nil {
			found = true
			return nil
		}
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return err
	}); err != nil {
		t.Fatalf("look up link %s on %s: %v", name, n.Name, err)
	}
	return found
}

// endpointRecorded reports whether the node's endpoint map has a pod at ip, or its ipcache
// has ip as a local pod.
func endpointRecorded(t *testing.T, n *lab.Node, ip netip.Addr) bool {
	t.Helper()
	m, err := loader.OpenPinnedMaps(n.PinRoot())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	eps, err := m.DumpEndpoints()
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range eps {
		if loader.BEToAddr(v.Addr) == ip {
			return true
		}
	}
	ipc, err := m.DumpIPCache()
	if err != nil {
		t.Fatal(err)
	}
	v, ok := ipc[loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(ip)}]
	return ok && v.Flags&loader.IPCacheFlagLocal != 0
}

// allocated reports whether the node's agent has ip allocated to a pod.
func allocated(t *testing.T, ctx context.Context, n *lab.Node, ip netip.Addr) bool {
	t.Helper()
	st, err := n.Client().State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range st.Allocations {
		if a.IP == ip.String() {
			return true
		}
	}
	return false
}
