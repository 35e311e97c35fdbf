//go:build linux

package kube_test

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/test/lab"
)

// TestChaosUnderNodePortAndPolicyTraffic runs the agent kill -9 and the kube-apiserver
// restart with NodePort traffic from a client outside the cluster and a NetworkPolicy in
// force. The Service is eTP Local on node-1 (the client's address reaches the backend, so
// the policy can name it); the policy on the echo backends admits the external client
// (ipBlock) and pods labelled role=client. Two loads run through each fault: the external
// client through node-1's NodePort, and a role=client pod on node-2 through the ClusterIP.
// Meanwhile two denied peers keep trying: a pod without the label (ClusterIP) and a second
// external host (NodePort). No established flow may break, no denied attempt may ever
// connect, and new allowed connections must succeed again after the fault.
func TestChaosUnderNodePortAndPolicyTraffic(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	const ns = "e2e-chaos-np"
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	app := map[string]string{"app": "echo"}
	for _, p := range []lab.PodSpec{
		{Namespace: ns, Name: "echo-1", Node: "node-1", Labels: app, ServePort: 7000},
		{Namespace: ns, Name: "echo-2", Node: "node-2", Labels: app, ServePort: 7000},
		{Namespace: ns, Name: "client", Node: "node-2", Labels: map[string]string{"role": "client"}},
		{Namespace: ns, Name: "intruder", Node: "node-2"},
	} {
		if _, err := l.RunPod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	client, intruder := l.Pod(ns, "client"), l.Pod(ns, "intruder")
	svc, err := l.Client().CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal,
			Selector: app, Ports: []corev1.ServicePort{{Port: 7000, TargetPort: intstr.FromString("serve"), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	clusterIP := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 7000)
	n1, err := l.NodeByName("node-1")
	if err != nil {
		t.Fatal(err)
	}
	nodePort := netip.AddrPortFrom(netip.MustParseAddr(n1.PrimaryIP), uint16(svc.Spec.Ports[0].NodePort))
	onEveryNode(t, l, clusterIP, "TCP", []string{
		netip.AddrPortFrom(l.Pod(ns, "echo-1").IP, 7000).String(), netip.AddrPortFrom(l.Pod(ns, "echo-2").IP, 7000).String()})

	ext, err := l.ExternalClient()
	if err != nil {
		t.Fatal(err)
	}
	blocked, err := l.AddExternalHost(netip.MustParseAddr("203.0.113.20"))
	if err != nil {
		t.Fatal(err)
	}
	extD, blockedD := nsDialer{ext.NS()}, nsDialer{blocked.NS}
	// Before the policy every peer gets through: a denial later is the policy's doing, not
	// a route the lab lacks.
	eventually(t, 60*time.Second, "every peer reaches the Service before the policy", func() (bool, string) {
		st := fmt.Sprintf("intruder->ClusterIP %v, blocked->NodePort %v, client->ClusterIP %v, external->NodePort %v",
			connects(ctx, intruder, clusterIP.String()), connects(ctx, blockedD, nodePort.String()),
			connects(ctx, client, clusterIP.String()), connects(ctx, extD, nodePort.String()))
		return st == "intruder->ClusterIP true, blocked->NodePort true, client->ClusterIP true, external->NodePort true", st
	})
	if _, err := l.Client().NetworkingV1().NetworkPolicies(ns).Create(ctx, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "echo-ingress"},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: app},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
				{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "client"}}},
				{IPBlock: &networkingv1.IPBlock{CIDR: ext.IP.String() + "/32"}},
			}}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Enforced everywhere before any fault: the denied peers fail, the allowed ones answer.
	eventually(t, 60*time.Second, "the policy enforced on both paths", func() (bool, string) {
		st := fmt.Sprintf("intruder->ClusterIP %v, blocked->NodePort %v, client->ClusterIP %v, external->NodePort %v",
			connects(ctx, intruder, clusterIP.String()), connects(ctx, blockedD, nodePort.String()),
			connects(ctx, client, clusterIP.String()), connects(ctx, extD, nodePort.String()))
		return st == "intruder->ClusterIP false, blocked->NodePort false, client->ClusterIP true, external->NodePort true", st
	})

	for _, step := range []struct {
		name  string
		fault func(context.Context) error
	}{
		{"agent kill -9 on the NodePort node", func(ctx context.Context) error {
			if err := n1.KillAgent(); err != nil {
				return err
			}
			return n1.StartAgent(ctx)
		}},
		{"kube-apiserver restart", l.ControlPlane().RestartAPIServer},
	} {
		t.Run(strings.ReplaceAll(step.name, " ", "_"), func(t *testing.T) {
			np := startLoad(t, ctx, extD, nodePort, 10)
			cip := startLoad(t, ctx, client, clusterIP, 10)
			denied := startDeniedProbes(ctx, map[string]func() bool{
				"intruder pod -> ClusterIP":    func() bool { return connects(ctx, intruder, clusterIP.String()) },
				"blocked external -> NodePort": func() bool { return connects(ctx, blockedD, nodePort.String()) },
			})
			faultAt := time.Now()
			if err := step.fault(ctx); err != nil {
				t.Fatal(err)
			}
			back := time.Now()
			np.waitNewConns(t, back, 30, "new NodePort connections after the fault")
			cip.waitNewConns(t, back, 30, "new ClusterIP connections after the fault")
			// The denied peers keep trying until the allowed loads have recovered.
			attempts, leaks := denied.stop()
			rNP, rCIP := np.finish(faultAt), cip.finish(faultAt)
			t.Logf("%s: recovered in %v; NodePort from outside: %v; ClusterIP from a pod: %v; denied peers: %d attempts, %d connected",
				step.name, back.Sub(faultAt).Round(time.Millisecond), rNP, rCIP, attempts, len(leaks))
			requireNoBrokenFlows(t, rNP)
			requireNoBrokenFlows(t, rCIP)
			if len(leaks) > 0 {
				t.Fatalf("a denied peer connected during %s: %v", step.name, leaks)
			}
			if step.name == "kube-apiserver restart" && rNP.Failed+rCIP.Failed > 0 {
				t.Errorf("%d NodePort and %d ClusterIP new connections failed while the apiserver restarted: the datapath must not depend on it",
					rNP.Failed, rCIP.Failed)
			}
			if attempts == 0 {
				t.Fatal("the denied peers made no attempt during the fault")
			}
		})
	}
}

// connects tells whether d completes a TCP connection to addr and reads a Serve greeting
// within half a second (a denied SYN is dropped, so a denial costs the whole wait).
func connects(ctx context.Context, d dialer, addr string) bool {
	ctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	c, err := d.Dial(ctx, addr)
	if err != nil {
		return false
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	_ = c.SetDeadline(dl)
	_, err = bufio.NewReader(c).ReadString('\n')
	return err == nil
}

// deniedProbes tries denied connections in a loop and records any that connects.
type deniedProbes struct {
	done     chan struct{}
	wg       sync.WaitGroup
	mu       sync.Mutex
	attempts int
	leaks    []string
}

func startDeniedProbes(ctx context.Context, probes map[string]func() bool) *deniedProbes {
	d := &deniedProbes{done: make(chan struct{})}
	for name, try := range probes {
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			for ctx.Err() == nil {
				select {
				case <-d.done:
					return
				default:
				}
				ok := try()
				d.mu.Lock()
				d.attempts++
				if ok {
					d.leaks = append(d.leaks, fmt.Sprintf("%s at %s", name, time.Now().Format("15:04:05.000")))
				}
				d.mu.Unlock()
			}
		}()
	}
	return d
}

func (d *deniedProbes) stop() (int, []string) {
	close(d.done)
	d.wg.Wait()
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.attempts, d.leaks
}
