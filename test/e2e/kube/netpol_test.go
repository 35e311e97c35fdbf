//go:build linux

package kube_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/test/lab"
)

// TestNetworkPolicyUpstreamCases reproduces cases of the upstream NetworkPolicy e2e suite
// (kubernetes test/e2e/network/netpol) in the lab: the real apiserver, real tern-agents on
// two nodes, traffic between pod namespaces. A denied connection is a TCP SYN the datapath
// drops, seen as a connect that does not complete within connectTimeout. Each step waits
// (bounded) for its truth table, then checks it once more with no retry. The cases:
//
//   - default deny ingress (podSelector {}, policyTypes [Ingress])
//   - allow ingress by podSelector on a named port, in the policy's namespace only
//   - allow ingress by namespaceSelector AND podSelector on a port range (port 81, endPort 82)
//   - pod label update (a pod becomes selected), namespace label update (a namespace stops
//     being selected)
//   - an established connection survives the deletion of the policy that allowed it; a new
//     one is denied
//   - policy deletion restores access
//   - default deny egress, then egress to an ipBlock with except
//   - egress to a DNS-like UDP service (UDP 53 to pods selected by label)
func TestNetworkPolicyUpstreamCases(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := l.Client()
	const nsA, nsB = "np-a", "np-b"

	srv, err := l.RunPod(ctx, lab.PodSpec{Namespace: nsA, Name: "srv", Node: "node-1", Labels: map[string]string{"app": "srv"},
		ServePort: 80, Ports: []corev1.ContainerPort{{Name: "alt", ContainerPort: 81}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Serve(81); err != nil {
		t.Fatal(err)
	}
	stopDNS, err := serveUDPEcho(srv, 53)
	if err != nil {
		t.Fatal(err)
	}
	defer stopDNS()
	c1, err := l.RunPod(ctx, lab.PodSpec{Namespace: nsA, Name: "c1", Node: "node-2", Labels: map[string]string{"app": "client"}})
	if err != nil {
		t.Fatal(err)
	}
	c2, err := l.RunPod(ctx, lab.PodSpec{Namespace: nsA, Name: "c2", Node: "node-1", Labels: map[string]string{"app": "other"}})
	if err != nil {
		t.Fatal(err)
	}
	cb, err := l.RunPod(ctx, lab.PodSpec{Namespace: nsB, Name: "cb", Node: "node-2", Labels: map[string]string{"app": "client"}})
	if err != nil {
		t.Fatal(err)
	}
	labelNS(t, ctx, l, nsB, "team", "b")
	srv80 := netip.AddrPortFrom(srv.IP, 80).String()
	srv81 := netip.AddrPortFrom(srv.IP, 81).String()

	type probe struct {
		from *lab.Pod
		addr string
		want bool
	}
	expect := func(step string, probes ...probe) {
		t.Helper()
		check := func() (bool, string) {
			var bad []string
			for _, p := range probes {
				if got := reaches(ctx, p.from, p.addr); got != p.want {
					bad = append(bad, fmt.Sprintf("%s -> %s: %v, want %v", p.from.Key(), p.addr, got, p.want))
				}
			}
			return len(bad) == 0, strings.Join(bad, "; ")
		}
		eventually(t, 30*time.Second, step, check)
		if ok, why := check(); !ok {
			t.Fatalf("%s: settled, then changed: %s", step, why)
		}
	}
	create := func(np *networkingv1.NetworkPolicy) {
		t.Helper()
		if _, err := c.NetworkingV1().NetworkPolicies(np.Namespace).Create(ctx, np, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	del := func(ns, name string) {
		t.Helper()
		if err := c.NetworkingV1().NetworkPolicies(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	defer func() {
		for _, ns := range []string{nsA, nsB} {
			_ = c.NetworkingV1().NetworkPolicies(ns).DeleteCollection(context.WithoutCancel(ctx), metav1.DeleteOptions{}, metav1.ListOptions{})
		}
	}()

	expect("no policy: everything reaches srv", probe{c1, srv80, true}, probe{c2, srv80, true}, probe{cb, srv80, true})

	create(&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: nsA, Name: "default-deny-ingress"},
		Spec: networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}}})
	expect("default deny ingress", probe{c1, srv80, false}, probe{c2, srv80, false}, probe{cb, srv80, false})

	serve := intstr.FromString("serve")
	create(&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: nsA, Name: "allow-client"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "srv"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: &serve}},
			}}}})
	expect("allow app=client of the same namespace on the named port",
		probe{c1, srv80, true}, probe{c1, srv81, false}, probe{c2, srv80, false}, probe{cb, srv80, false})

	p81 := intstr.FromInt32(81)
	end := int32(82)
	create(&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: nsA, Name: "allow-team-b"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "srv"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{
					NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "b"}},
					PodSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: &p81, EndPort: &end}},
			}}}})
	expect("namespaceSelector AND podSelector on a port range",
		probe{cb, srv81, true}, probe{cb, srv80, false}, probe{c1, srv81, false}, probe{c1, srv80, true})

	relabelPod(t, ctx, l, c2, "app", "client")
	expect("a pod relabelled into the selector", probe{c2, srv80, true})
	labelNS(t, ctx, l, nsB, "team", "c")
	expect("a namespace relabelled out of the selector", probe{cb, srv81, false})

	// An established connection outlives the policy that allowed it.
	conn, err := c1.Dial(ctx, srv80)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := echo(conn, "before"); err != nil {
		t.Fatal(err)
	}
	del(nsA, "allow-client")
	expect("after allow-client is deleted, new connections are denied", probe{c1, srv80, false}, probe{c2, srv80, false})
	if err := echo(conn, "after"); err != nil {
		t.Fatalf("the established connection broke when its policy was deleted: %v", err)
	}

	del(nsA, "allow-team-b")
	del(nsA, "default-deny-ingress")
	expect("every policy deleted: everything reaches srv again", probe{c1, srv80, true}, probe{c2, srv80, true}, probe{cb, srv80, true})

	// Egress of c1: deny, then an ipBlock that holds srv's /24 except srv itself, then srv
	// itself.
	create(&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: nsA, Name: "c1-deny-egress"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}}})
	expect("default deny egress", probe{c1, srv80, false}, probe{c2, srv80, false}, probe{cb, srv80, true})
	if ok := askUDP(ctx, c1, netip.AddrPortFrom(srv.IP, 53)); ok {
		t.Fatal("default deny egress: c1's UDP query to srv:53 was answered")
	}

	block := netip.PrefixFrom(srv.IP, 24).Masked().String()
	create(&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: nsA, Name: "c1-egress-cidr"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress: []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{{
				IPBlock: &networkingv1.IPBlock{CIDR: block, Except: []string{srv.IP.String() + "/32"}}}}}}}})
	// Nothing observable changes: the except holds srv out. Then allow srv's /32.
	create(&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: nsA, Name: "c1-egress-srv"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress: []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{{
				IPBlock: &networkingv1.IPBlock{CIDR: srv.IP.String() + "/32"}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: &p81}}}}}})
	expect("egress to an ipBlock /32 on port 81 only (the wider block excepts srv)",
		probe{c1, srv81, true}, probe{c1, srv80, false})

	udp := corev1.ProtocolUDP
	dns := intstr.FromInt32(53)
	create(&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: nsA, Name: "c1-egress-dns"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress: []networkingv1.NetworkPolicyEgressRule{{
				To:    []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{}, PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "srv"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &udp, Port: &dns}}}}}})
	eventually(t, 30*time.Second, "egress to the DNS-like UDP service", func() (bool, string) {
		return askUDP(ctx, c1, netip.AddrPortFrom(srv.IP, 53)), "no answer"
	})
	if !askUDP(ctx, c1, netip.AddrPortFrom(srv.IP, 53)) {
		t.Fatal("egress to UDP 53: settled, then no answer")
	}
	expect("UDP 53 allowed does not open TCP 80", probe{c1, srv80, false})
}

// connectTimeout bounds a connection the datapath may drop: a denied SYN never completes.
const connectTimeout = 2 * time.Second

// reaches tells whether from completes a TCP connection to addr and reads the greeting.
func reaches(ctx context.Context, from *lab.Pod, addr string) bool {
	ctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	_, err := from.Ask(ctx, addr, "ping")
	return err == nil
}

// echo sends a line on an open Serve connection (greeting already read or not) and waits
// for it back.
func echo(c net.Conn, msg string) error {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c, "%s\n", msg); err != nil {
		return err
	}
	buf := make([]byte, 4096)
	var got string
	for !strings.Contains(got, msg+"\n") {
		n, err := c.Read(buf)
		if err != nil {
			return fmt.Errorf("read echo of %q (have %q): %w", msg, got, err)
		}
		got += string(buf[:n])
	}
	return nil
}

// serveUDPEcho answers every datagram on port inside p with the same bytes (a DNS-like
// service, for egress tests; see newUDPEcho).
func serveUDPEcho(p *lab.Pod, port int) (func(), error) {
	e, err := newUDPEcho(p, port)
	if err != nil {
		return nil, err
	}
	return e.close, nil
}

// udpEcho is a UDP echo server in a pod that records when it answered each client. An
// allowed UDP probe needs this process to run (a TCP handshake needs only the kernel), so on
// a starved machine an echo can be sent after the probe's bound; the record lets the probe
// tell "the request never reached the server" (a drop) from "the server answered late" by
// the kernel's state and the server's record, not by how long it waited.
type udpEcho struct {
	pc       net.PacketConn
	rc       syscall.RawConn
	mu       sync.Mutex // held from dequeuing a datagram to recording its answer
	answered map[netip.AddrPort]time.Time
	late     int // probes that saw no echo in time but found the server had answered
}

func newUDPEcho(p *lab.Pod, port int) (*udpEcho, error) {
	var pc net.PacketConn
	if err := p.Exec(func() error {
		var err error
		pc, err = net.ListenPacket("udp4", fmt.Sprintf(":%d", port))
		return err
	}); err != nil {
		return nil, fmt.Errorf("listen udp %d in %s: %w", port, p.Key(), err)
	}
	rc, err := pc.(*net.UDPConn).SyscallConn()
	if err != nil {
		pc.Close()
		return nil, err
	}
	e := &udpEcho{pc: pc, rc: rc, answered: map[netip.AddrPort]time.Time{}}
	go e.serve()
	return e, nil
}

func (e *udpEcho) close() { e.pc.Close() }

// lateAnswers is how many probes found their echo only through the server's record.
func (e *udpEcho) lateAnswers() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.late
}

// serve dequeues and answers datagrams one at a time under mu, so idle (below) never sees an
// empty queue while a dequeued datagram is still unanswered.
func (e *udpEcho) serve() {
	buf := make([]byte, 1500)
	for {
		err := e.rc.Read(func(fd uintptr) bool {
			e.mu.Lock()
			defer e.mu.Unlock()
			n, from, err := unix.Recvfrom(int(fd), buf, unix.MSG_DONTWAIT)
			if errors.Is(err, unix.EAGAIN) {
				return false // wait for the next datagram
			}
			if err != nil {
				return true
			}
			if in4, ok := from.(*unix.SockaddrInet4); ok {
				_ = unix.Sendto(int(fd), buf[:n], unix.MSG_DONTWAIT, from)
				e.answered[netip.AddrPortFrom(netip.AddrFrom4(in4.Addr), uint16(in4.Port))] = time.Now()
			}
			return true
		})
		if err != nil {
			return // closed
		}
	}
}

// idle tells whether every datagram the kernel delivered to the socket has been answered.
func (e *udpEcho) idle() (bool, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	var n int
	var ierr error
	if err := e.rc.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); err != nil {
		return false, err
	}
	return n == 0, ierr
}

// answeredAt waits (up to limit) until the server has answered everything queued to it, then
// tells when it answered client, if it did.
func (e *udpEcho) answeredAt(client netip.AddrPort, limit time.Duration) (time.Time, bool, error) {
	deadline := time.Now().Add(limit)
	for {
		ok, err := e.idle()
		if err != nil {
			return time.Time{}, false, err
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			return time.Time{}, false, fmt.Errorf("udp echo %s still has datagrams queued after %s", e.pc.LocalAddr(), limit)
		}
		time.Sleep(5 * time.Millisecond) // poll interval of a condition wait
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	t, ok := e.answered[client]
	if ok {
		e.late++
	}
	return t, ok, nil
}

// askUDP sends one datagram from p to addr and tells whether it came back in time.
func askUDP(ctx context.Context, p *lab.Pod, addr netip.AddrPort) bool {
	var c net.Conn
	if err := p.Exec(func() error {
		var err error
		var d net.Dialer
		c, err = d.DialContext(ctx, "udp4", addr.String())
		return err
	}); err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(connectTimeout))
	if _, err := c.Write([]byte("query")); err != nil {
		return false
	}
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	return err == nil && string(buf[:n]) == "query"
}

func labelNS(t *testing.T, ctx context.Context, l *lab.Lab, ns, k, v string) {
	t.Helper()
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%q}}}`, k, v)
	if _, err := l.Client().CoreV1().Namespaces().Patch(ctx, ns, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

func relabelPod(t testing.TB, ctx context.Context, l *lab.Lab, p *lab.Pod, k, v string) {
	t.Helper()
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%q}}}`, k, v)
	if _, err := l.Client().CoreV1().Pods(p.Namespace).Patch(ctx, p.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(errors.Join(fmt.Errorf("relabel %s", p.Key()), err))
	}
}
