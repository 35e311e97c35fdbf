//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/internal/sockclient"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/test/lab"
)

// TestKubernetesSocketLBHostNetwork: with socket LB on, a host-network process (a process in
// a node's namespace and in the cgroup that node's agent attached the hooks to) reaches a
// ClusterIP Service whose backends are pods on both nodes, sees the ClusterIP as its peer,
// and is counted by the agent's socket hooks, not by any tc program.
func TestKubernetesSocketLBHostNetwork(t *testing.T) {
	l := upKubernetes(t, lab.Options{Nodes: 2, SocketLB: true})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	c := l.Client()
	const ns = "hostnet"
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "echo"}, Ports: []corev1.ServicePort{
			{Name: "echo", Port: 7, TargetPort: intstr.FromInt32(7777), Protocol: corev1.ProtocolTCP},
			{Name: "dns", Port: 53, TargetPort: intstr.FromInt32(5353), Protocol: corev1.ProtocolUDP},
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := svc.Spec.ClusterIP
	want := map[string]bool{}
	pods := map[string]*lab.Pod{}
	for i := range 2 {
		p, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: fmt.Sprintf("echo-%d", i), Node: l.Node(i).Name,
			Labels: map[string]string{"app": "echo"}})
		if err != nil {
			t.Fatal(err)
		}
		want[p.Name] = true
		pods[p.Name] = p
		serveWho(t, p, 7777)
		serveWhoUDP(t, p, 5353)
	}

	node := l.Node(0)
	// The real condition for host-network connects to succeed: the node's agent has both
	// backends of each port in its pinned service map. From then on every connect must.
	var tcpBackends, udpBackends []netip.AddrPort
	for _, p := range pods {
		tcpBackends = append(tcpBackends, netip.AddrPortFrom(p.IP, 7777))
		udpBackends = append(udpBackends, netip.AddrPortFrom(p.IP, 5353))
	}
	waitBackends(t, node, netip.MustParseAddrPort(vip+":7"), "TCP", tcpBackends...)
	waitBackends(t, node, netip.MustParseAddrPort(vip+":53"), "UDP", udpBackends...)
	host := sockclient.Start(t, node.NS, node.Cgroup())
	before := sockConnects(t, node)
	// Connect until every backend has answered (the choice is random); each connect must
	// succeed, reach a backend and show the ClusterIP as its peer.
	seen := map[string]int{}
	for i := 0; len(seen) < len(want); i++ {
		if i == 200 {
			t.Fatalf("200 host-network connects to %s:7 reached only %v", vip, seen)
		}
		a := host.Do("tcp " + vip + ":7")
		if a.Err != "" {
			t.Fatalf("host-network connect %d to %s:7 after the Service was programmed: %s", i, vip, a.Err)
		}
		if !want[a.Who] {
			t.Fatalf("answer from %q, not a backend of the Service", a.Who)
		}
		if a.Peer != vip+":7" {
			t.Fatalf("getpeername of the host-network socket is %s, want the ClusterIP %s:7", a.Peer, vip)
		}
		seen[a.Who]++
	}
	total := 0
	for _, n := range seen {
		total += n
	}
	if got := sockConnects(t, node) - before; got < uint64(total) {
		t.Fatalf("the socket hooks of %s counted %d connects, the client made %d", node.Name, got, total)
	}
	t.Logf("host-network process on %s reached %v through %s:7; getpeername showed the ClusterIP", node.Name, seen, vip)

	// A connected UDP socket of the host-network process; its backend then leaves the
	// Service (not ready) while the pod keeps answering. The agent's reconciler removes it,
	// and its destroy pass must find the socket in the node's namespace.
	first := host.OK("udpconn " + vip + ":53")
	if first.Peer != vip+":53" || !want[first.Who] {
		t.Fatalf("connected UDP through the ClusterIP: %+v", first)
	}
	if err := l.SetPodReady(ctx, pods[first.Who], false); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		a := host.Do("udpheld")
		if a.Err != "" {
			t.Logf("after %s left the Service the held socket failed: %s", first.Who, a.Err)
			break
		}
		if a.Who != first.Who {
			t.Fatalf("the held socket was answered by %s, it is connected to %s", a.Who, first.Who)
		}
		if time.Now().After(deadline) {
			t.Fatalf("30s after %s became not ready its connected UDP socket still reaches it", first.Who)
		}
		time.Sleep(20 * time.Millisecond)
	}
	again := host.OK("udpconn " + vip + ":53")
	if again.Who == first.Who || !want[again.Who] || again.Peer != vip+":53" {
		t.Fatalf("a new socket after the destroy: %+v (the removed backend is %s)", again, first.Who)
	}
	if got := sockCounter(t, node, loader.ReasonSockDestroy); got == 0 {
		t.Fatal("the destroy was not counted as sock_destroy")
	}
}

func sockConnects(t *testing.T, n *lab.Node) uint64 {
	return sockCounter(t, n, loader.ReasonSockConnect)
}

// sockCounter reads one of the node's sock-direction counters from its pinned tern_metrics.
func sockCounter(t *testing.T, n *lab.Node, r loader.Reason) uint64 {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(n.PinRoot(), loader.PodMapTernMetrics), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	tot, err := (&loader.Maps{Metrics: m}).MetricsTotals()
	if err != nil {
		t.Fatal(err)
	}
	return tot[loader.MetricsKey{Reason: r, Dir: loader.DirSock}].Packets
}
