//go:build linux

package lab_test

import (
	"context"
	"fmt"
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
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := svc.Spec.ClusterIP
	want := map[string]bool{}
	for i := range 2 {
		p, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: fmt.Sprintf("echo-%d", i), Node: l.Node(i).Name,
			Labels: map[string]string{"app": "echo"}, ServePort: 7777})
		if err != nil {
			t.Fatal(err)
		}
		want[ns+"/"+p.Name] = true
	}

	node := l.Node(0)
	host := sockclient.Start(t, node.NS, node.Cgroup())
	before := sockConnects(t, node)
	// Until the EndpointSlice reaches the agent the ClusterIP has no backends (connect is
	// refused) or none at all; wait for every backend to have answered.
	seen := map[string]int{}
	deadline := time.Now().Add(30 * time.Second)
	var last sockclient.Answer
	for len(seen) < len(want) {
		if time.Now().After(deadline) {
			t.Fatalf("after 30s host-network connects to %s:7 reached only %v (last: %+v)", vip, seen, last)
		}
		last = host.Do("tcp " + vip + ":7")
		if last.Err != "" {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		if !want[last.Who] {
			t.Fatalf("answer from %q, not a backend of the Service", last.Who)
		}
		if last.Peer != vip+":7" {
			t.Fatalf("getpeername of the host-network socket is %s, want the ClusterIP %s:7", last.Peer, vip)
		}
		seen[last.Who]++
	}
	total := 0
	for _, n := range seen {
		total += n
	}
	if got := sockConnects(t, node) - before; got < uint64(total) {
		t.Fatalf("the socket hooks of %s counted %d connects, the client made %d", node.Name, got, total)
	}
	t.Logf("host-network process on %s reached %v through %s:7; getpeername showed the ClusterIP", node.Name, seen, vip)
}

// sockConnects reads the node's sock_connect counter from its pinned tern_metrics.
func sockConnects(t *testing.T, n *lab.Node) uint64 {
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
	return tot[loader.MetricsKey{Reason: loader.ReasonSockConnect, Dir: loader.DirSock}].Packets
}
