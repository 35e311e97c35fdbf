//go:build linux

package kube_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/test/lab"
)

// frontendFlags reads a frontend's flags (enum svc_flag) from a node's maps; ok false when
// the frontend is not there.
func frontendFlags(t *testing.T, n *lab.Node, front netip.AddrPort) (uint16, bool) {
	t.Helper()
	m, err := loader.OpenPinnedMaps(n.PinRoot())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var v loader.ServiceValue
	k := loader.ServiceKey{Addr: loader.AddrToBE(front.Addr()), Port: loader.PortToBE(front.Port()), Proto: 6}
	if err := m.Services.Lookup(k, &v); err != nil {
		return 0, false
	}
	return v.Flags, true
}

// backendsAndClient runs three HTTP backends (port 8080) labelled labels, <prefix>-0 and -2 on
// node-1 and -1 on node-2, and a pod "client" on node-2, all in namespace ns.
func backendsAndClient(t *testing.T, ctx context.Context, l *lab.Lab, ns, prefix string, labels map[string]string) (map[string]*lab.Pod, *lab.Pod) {
	t.Helper()
	pods := map[string]*lab.Pod{}
	for i, node := range []string{"node-1", "node-2", "node-1"} {
		name := fmt.Sprintf("%s-%d", prefix, i)
		p, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: name, Node: node, Labels: labels, HTTPPort: 8080})
		if err != nil {
			t.Fatal(err)
		}
		pods[name] = p
	}
	client, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "client", Node: "node-2"})
	if err != nil {
		t.Fatal(err)
	}
	return pods, client
}

func waitFlags(t *testing.T, l *lab.Lab, front netip.AddrPort, want uint16) {
	t.Helper()
	for _, n := range l.Nodes() {
		eventually(t, 60*time.Second, fmt.Sprintf("flags of %s on %s", front, n.Name), func() (bool, string) {
			got, ok := frontendFlags(t, n, front)
			return ok && got == want, fmt.Sprintf("present %v, flags %#x", ok, got)
		})
	}
}

// datapathCount is the node's from-pod packet count for reason r (e.g. packets sent with a
// changed source port because their translated tuple was another live flow's).
func datapathCount(t *testing.T, n *lab.Node, r loader.Reason) uint64 {
	t.Helper()
	m, err := loader.OpenPinnedMaps(n.PinRoot())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	tot, err := m.MetricsTotals()
	if err != nil {
		t.Fatal(err)
	}
	return tot[loader.MetricsKey{Reason: r, Dir: loader.DirFromPod}].Packets
}

// sessionAffinity ClientIP through the real apiserver: a client's new connections all reach
// one backend; switching affinity off spreads them again; when the backend the client is
// stuck to goes away, the client moves to one other backend and sticks there.
func TestSessionAffinityClientIP(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	const ns = "e2e-affinity"
	c := l.Client()
	app := map[string]string{"app": "sticky"}
	pods, client := backendsAndClient(t, ctx, l, ns, "sticky", app)
	svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "sticky"},
		Spec: corev1.ServiceSpec{Selector: app, SessionAffinity: corev1.ServiceAffinityClientIP,
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	front := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)
	url := "http://" + front.String() + "/"
	ep := func(p *lab.Pod) string { return netip.AddrPortFrom(p.IP, 8080).String() }
	onEveryNode(t, l, front, "TCP", []string{ep(pods["sticky-0"]), ep(pods["sticky-1"]), ep(pods["sticky-2"])})
	waitFlags(t, l, front, loader.SvcFlagAffinity)

	seen := whoAnswers(t, client, url, 20)
	if len(seen) != 1 {
		t.Fatalf("with ClientIP affinity 20 connections were answered by %v, want one pod", seen)
	}
	var stuck string
	for name := range seen {
		stuck = name
	}
	t.Logf("affinity: all 20 answered by %s", stuck)

	// The stuck-to backend goes: the client moves to one of the others, and stays.
	if err := l.DeletePod(ctx, pods[stuck]); err != nil {
		t.Fatal(err)
	}
	var rest []string
	for name, p := range pods {
		if name != stuck {
			rest = append(rest, ep(p))
		}
	}
	onEveryNode(t, l, front, "TCP", rest)
	seen = whoAnswers(t, client, url, 20)
	if len(seen) != 1 || seen[stuck] != 0 {
		t.Fatalf("after %s left, 20 connections were answered by %v, want one other pod", stuck, seen)
	}
	t.Logf("after the backend left: all answered by %v", seen)

	// Affinity off: connections spread over both remaining backends (all 30 on one of two has
	// probability 2^-29).
	svc, err = c.CoreV1().Services(ns).Get(ctx, "sticky", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svc.Spec.SessionAffinity = corev1.ServiceAffinityNone
	svc.Spec.SessionAffinityConfig = nil
	if _, err := c.CoreV1().Services(ns).Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFlags(t, l, front, 0)
	if seen = whoAnswers(t, client, url, 30); len(seen) != 2 {
		t.Fatalf("without affinity 30 connections were answered by %v, want both remaining pods", seen)
	}
	if err := c.CoreV1().Services(ns).Delete(ctx, "sticky", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	onEveryNode(t, l, front, "TCP", nil)
}

// internalTrafficPolicy Local through the real apiserver: each node's clients reach only
// that node's endpoints; a node with none drops (the client's connect times out, it is not
// refused), as kube-proxy does, while a Service with no endpoints at all still rejects.
func TestInternalTrafficPolicyLocal(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	const ns = "e2e-itp"
	c := l.Client()
	app := map[string]string{"app": "local"}
	web1, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "local-1", Node: "node-1", Labels: app, HTTPPort: 8080})
	if err != nil {
		t.Fatal(err)
	}
	web2, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "local-2", Node: "node-2", Labels: app, HTTPPort: 8080})
	if err != nil {
		t.Fatal(err)
	}
	client1, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "client-1", Node: "node-1"})
	if err != nil {
		t.Fatal(err)
	}
	client2, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "client-2", Node: "node-2"})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "local"},
		Spec: corev1.ServiceSpec{Selector: app, InternalTrafficPolicy: ptr.To(corev1.ServiceInternalTrafficPolicyLocal),
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	front := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)
	url := "http://" + front.String() + "/"
	n1, err := l.NodeByName("node-1")
	if err != nil {
		t.Fatal(err)
	}
	n2, err := l.NodeByName("node-2")
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct {
		n    *lab.Node
		pod  *lab.Pod
		cl   *lab.Pod
		name string
	}{{n1, web1, client1, "local-1"}, {n2, web2, client2, "local-2"}} {
		want := []string{netip.AddrPortFrom(w.pod.IP, 8080).String()}
		eventually(t, 60*time.Second, "local backends on "+w.n.Name, func() (bool, string) {
			got, ok := backendsOn(t, w.n, front, "TCP")
			return ok && len(got) == 1 && got[0] == want[0], fmt.Sprintf("present %v, backends %v", ok, got)
		})
		if seen := whoAnswers(t, w.cl, url, 10); len(seen) != 1 || seen[w.name] != 10 {
			t.Fatalf("client on %s was answered by %v, want only %s", w.n.Name, seen, w.name)
		}
	}

	// node-2 loses its endpoint; node-1 keeps one: node-2 drops.
	if err := l.DeletePod(ctx, web2); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "no local backend, drop flag on node-2", func() (bool, string) {
		got, ok := backendsOn(t, n2, front, "TCP")
		flags, _ := frontendFlags(t, n2, front)
		return ok && len(got) == 0 && flags&loader.SvcFlagDropEmpty != 0, fmt.Sprintf("backends %v flags %#x", got, flags)
	})
	drops := datapathCount(t, n2, loader.ReasonDropNoLocalBackend)
	dctx, dcancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	conn, err := client2.Dial(dctx, front.String())
	dcancel()
	if err == nil {
		conn.Close()
		t.Fatal("connected through a Service with no local endpoint")
	}
	// The dial's deadline shows as context.DeadlineExceeded or as the socket's own
	// timeout ("i/o timeout"), depending on where the dialer was waiting when it fired.
	var ne net.Error
	timedOut := errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
	if errors.Is(err, syscall.ECONNREFUSED) || !timedOut {
		t.Fatalf("connect with no local endpoint: %v; want a timeout (dropped), not a refusal", err)
	}
	if got := datapathCount(t, n2, loader.ReasonDropNoLocalBackend) - drops; got == 0 {
		t.Fatal("drop_no_local_backend did not count the dropped SYNs")
	}
	if seen := whoAnswers(t, client1, url, 5); seen["local-1"] != 5 {
		t.Fatalf("node-1's client was answered by %v, want local-1", seen)
	}

	// No endpoint anywhere: rejected (refused at once) on both nodes.
	if err := l.DeletePod(ctx, web1); err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct {
		n  *lab.Node
		cl *lab.Pod
	}{{n1, client1}, {n2, client2}} {
		eventually(t, 60*time.Second, "reject state on "+w.n.Name, func() (bool, string) {
			got, ok := backendsOn(t, w.n, front, "TCP")
			flags, _ := frontendFlags(t, w.n, front)
			return ok && len(got) == 0 && flags == 0, fmt.Sprintf("backends %v flags %#x", got, flags)
		})
		rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
		conn, err := w.cl.Dial(rctx, front.String())
		rcancel()
		if err == nil {
			conn.Close()
			t.Fatalf("connected on %s through a Service with no endpoints", w.n.Name)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("connect on %s with no endpoints: %v; want connection refused", w.n.Name, err)
		}
	}
	if err := c.CoreV1().Services(ns).Delete(ctx, "local", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	onEveryNode(t, l, front, "TCP", nil)
}

// Maglev chosen by annotation through the real apiserver: Cilium's spelling turns it on (a
// table in every node's maps, requests still reach every backend), tern's spelling set to
// random turns it off again and the table goes.
func TestMaglevAnnotation(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	const ns = "e2e-maglev"
	c := l.Client()
	app := map[string]string{"app": "maglev"}
	pods, client := backendsAndClient(t, ctx, l, ns, "maglev", app)
	var want []string
	for _, p := range pods {
		want = append(want, netip.AddrPortFrom(p.IP, 8080).String())
	}
	svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "maglev", Annotations: map[string]string{"service.cilium.io/lb-algorithm": "maglev"}},
		Spec: corev1.ServiceSpec{Selector: app,
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	front := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)
	onEveryNode(t, l, front, "TCP", want)
	waitFlags(t, l, front, loader.SvcFlagMaglev)
	maglevBlocks := func(n *lab.Node) int {
		m, err := loader.OpenPinnedMaps(n.PinRoot())
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		b, err := m.DumpMaglev()
		if err != nil {
			t.Fatal(err)
		}
		return len(b)
	}
	// 3 backends: a 509-entry table, 32 blocks (other tests' Services use no Maglev).
	for _, n := range l.Nodes() {
		if got := maglevBlocks(n); got != 32 {
			t.Fatalf("%s holds %d Maglev blocks, want 32 (509 entries)", n.Name, got)
		}
	}
	// 30 connections from varying source ports spread over all three (all on two or fewer
	// has probability under 3 × (2/3)^30 < 1e-4 for a table of equal shares).
	if seen := whoAnswers(t, client, "http://"+front.String()+"/", 30); len(seen) != 3 {
		t.Fatalf("30 connections through a Maglev Service were answered by %v, want all three", seen)
	}

	svc, err = c.CoreV1().Services(ns).Get(ctx, "maglev", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svc.Annotations["service.tern.io/lb-algorithm"] = "random"
	if _, err := c.CoreV1().Services(ns).Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFlags(t, l, front, 0)
	for _, n := range l.Nodes() {
		eventually(t, 30*time.Second, "Maglev table gone on "+n.Name, func() (bool, string) {
			got := maglevBlocks(n)
			return got == 0, fmt.Sprintf("%d blocks", got)
		})
	}
	if err := c.CoreV1().Services(ns).Delete(ctx, "maglev", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	onEveryNode(t, l, front, "TCP", nil)
}
