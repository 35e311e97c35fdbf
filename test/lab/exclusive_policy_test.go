//go:build linux

package lab_test

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/ternctl"
	"github.com/tern-net/tern/test/lab"
)

// TestExclusiveENIBackendIngressPolicy: an exclusive-ENI backend sees its own node's address
// for the flows its node translates to it (an exclusive pod of the node through a ClusterIP,
// an external client through the node's NodePort, eTP Cluster), and traffic from the pod's
// own node is always allowed; its ingress NetworkPolicy must still judge the real client.
// With a policy taking only pods labelled role=client and one external address (ipBlock), on
// TCP 9090 and UDP 9053: the allowed exclusive pod (TCP, UDP) and external client are
// answered, the denied ones are not, and
// the denials are counted as any ingress denial (the policy's denied verdicts, drop_policy
// from-pod and from-netdev). The backend still reaches itself through its Service (a pod
// cannot block access to itself).
func TestExclusiveENIBackendIngressPolicy(t *testing.T) {
	l := upExclusive(t, lab.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := l.Client()
	n0 := l.Node(0)
	const ns = "expol"
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	const port, udpPort, nodePort = 9090, 9053, 30197
	svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "be"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyCluster,
			Selector: map[string]string{"app": "ex-be"}, Ports: []corev1.ServicePort{
				{Name: "tcp", Port: 80, NodePort: nodePort, TargetPort: intstr.FromInt32(port), Protocol: corev1.ProtocolTCP},
				{Name: "udp", Port: 53, TargetPort: intstr.FromInt32(udpPort), Protocol: corev1.ProtocolUDP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	exAnn := map[string]string{ipam.AnnotationENI: "true"}
	be, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "ex-be", Node: n0.Name, Labels: map[string]string{"app": "ex-be"}, Annotations: exAnn})
	if err != nil {
		t.Fatal(err)
	}
	checkExclusivePod(t, l, ctx, be)
	serveWho(t, be, port)
	serveWhoUDP(t, be, udpPort)
	allowedPod, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "ex-allowed", Node: n0.Name,
		Labels: map[string]string{"role": "client"}, Annotations: exAnn})
	if err != nil {
		t.Fatal(err)
	}
	checkExclusivePod(t, l, ctx, allowedPod)
	deniedPod, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "ex-denied", Node: n0.Name, Annotations: exAnn})
	if err != nil {
		t.Fatal(err)
	}
	checkExclusivePod(t, l, ctx, deniedPod)

	// Two external clients: the lab's, which the policy allows, and a second address on
	// the same host (same link, same VPC route back), which it does not.
	ext, err := l.ExternalClient()
	if err != nil {
		t.Fatal(err)
	}
	deniedExt := netip.MustParseAddr("198.51.100.11")
	extAddr := &netlink.Addr{IPNet: &net.IPNet{IP: deniedExt.AsSlice(), Mask: net.CIDRMask(24, 32)}}
	if err := ext.Exec(func() error {
		eth, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		return netlink.AddrAdd(eth, extAddr)
	}); err != nil {
		t.Fatalf("second address on the external client: %v", err)
	}
	t.Cleanup(func() {
		_ = ext.Exec(func() error {
			eth, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			return netlink.AddrDel(eth, extAddr)
		})
	})

	beAddr := netip.AddrPortFrom(be.IP, port)
	vip := netip.MustParseAddr(svc.Spec.ClusterIP)
	npAddr := netip.AddrPortFrom(netip.MustParseAddr(n0.PrimaryIP), nodePort)
	waitBackends(t, n0, netip.AddrPortFrom(vip, 80), "TCP", beAddr)
	waitBackends(t, n0, netip.AddrPortFrom(vip, 53), "UDP", netip.AddrPortFrom(be.IP, udpPort))
	waitBackends(t, n0, npAddr, "TCP", beAddr)

	_, err = c.NetworkingV1().NetworkPolicies(ns).Create(ctx, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "be-clients"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "ex-be"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{
					{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "client"}}},
					{IPBlock: &networkingv1.IPBlock{CIDR: lab.ExternalClientIP + "/32"}},
				},
				Ports: []networkingv1.NetworkPolicyPort{{Port: ptrTo(intstr.FromInt32(port))},
					{Protocol: ptrTo(corev1.ProtocolUDP), Port: ptrTo(intstr.FromInt32(udpPort))}}}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const policyName = ns + "/be-clients"
	for deadline := time.Now().Add(30 * time.Second); ; {
		v := ternctlJSON[api.PolicyView](t, ctx, n0, "bpf", "policy", "get", be.IP.String())
		if v.IsolatedIngress && len(v.Policies) == 1 && v.Policies[0].Name == policyName {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("policy %s never reached %s's maps: %+v", policyName, n0.Name, v)
		}
		time.Sleep(20 * time.Millisecond)
	}
	before := policyCounts(t, ctx, n0, policyName)

	clusterTCP := net.JoinHostPort(svc.Spec.ClusterIP, "80")
	clusterUDP := net.JoinHostPort(svc.Spec.ClusterIP, "53")
	np := npAddr.String()
	allowed := []struct {
		name string
		from netns.NsHandle
		src  netip.Addr // bind to it; invalid: the default
		addr string
	}{
		{"exclusive pod role=client -> ClusterIP", allowedPod.NS(), netip.Addr{}, clusterTCP},
		{"the backend -> its own ClusterIP (hairpin)", be.NS(), netip.Addr{}, clusterTCP},
		{"external client in the ipBlock -> NodePort of the backend's node", ext.NS(), netip.Addr{}, np},
	}
	for _, tc := range allowed {
		// Several flows each: a verdict cached wrongly, or a later packet judged against
		// the node, would show on the second.
		for i := range 3 {
			who, seen, err := dialWhoFrom(ctx, tc.from, tc.src, tc.addr, 3*time.Second)
			host, _, _ := net.SplitHostPort(seen)
			if err != nil || who != be.Name || host != n0.PrimaryIP {
				t.Errorf("%s (%s, flow %d): answer %q from %q, %v; want %s seeing %s", tc.name, tc.addr, i, who, seen, err, be.Name, n0.PrimaryIP)
				break
			}
		}
	}
	denied := []struct {
		name string
		from netns.NsHandle
		src  netip.Addr
		addr string
	}{
		{"exclusive pod without role=client -> ClusterIP", deniedPod.NS(), netip.Addr{}, clusterTCP},
		{"external client outside the ipBlock -> NodePort of the backend's node", ext.NS(), deniedExt, np},
	}
	// ternctl monitor shows both denials as the backend's ingress verdicts, naming the
	// backend (not the client whose veth, or the NodePort address, the packet had) and the
	// real client.
	mctx, mcancel := context.WithTimeout(ctx, 30*time.Second)
	defer mcancel()
	lines, done := startMonitor(t, mctx, n0, "monitor", "--pod", ns+"/ex-be", "--type", "policy", "--count", "2", "-o", "json")
	for _, tc := range denied {
		who, seen, err := dialWhoFrom(ctx, tc.from, tc.src, tc.addr, 700*time.Millisecond)
		// A policy denial drops: the client times out, it is not refused.
		if err == nil || errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("%s (%s): answer %q seeing %q, %v; want a timeout (denied by %s)", tc.name, tc.addr, who, seen, err, policyName)
		}
	}

	peers := map[netip.Addr]bool{}
	for range 2 {
		select {
		case line, ok := <-lines:
			if !ok {
				t.Fatalf("monitor ended after %d of 2 denials (exit %d)", len(peers), <-done)
			}
			var ev ternctl.PolicyEvent
			if err := json.Unmarshal([]byte(line), &ev); err != nil {
				t.Fatalf("%q: %v", line, err)
			}
			if ev.Verdict != "denied" || ev.Direction != "ingress" || ev.Policy != policyName || ev.Pod != ns+"/ex-be" ||
				ev.PodAddress != be.IP || ev.Port != port || ev.Proto != "TCP" {
				t.Errorf("policy event %s: want the backend's ingress denial by %s on %d", line, policyName, port)
			}
			peers[ev.Peer] = true
		case <-time.After(5 * time.Second):
			t.Fatalf("monitor showed %d of 2 denials within 5s: %v", len(peers), peers)
		}
	}
	if !peers[deniedPod.IP] || !peers[deniedExt] {
		t.Errorf("denials shown for peers %v, want %s (the pod) and %s (the external client)", peers, deniedPod.IP, deniedExt)
	}
	if code := <-done; code != 0 {
		t.Errorf("monitor --count 2 exited %d", code)
	}

	// UDP takes the same open: the allowed pod is answered, the denied one is not.
	if who, seen, err := askWhoUDP(ctx, allowedPod.NS(), clusterUDP, 3*time.Second); err != nil || who != be.Name {
		t.Errorf("exclusive pod role=client -> ClusterIP UDP: answer %q seeing %q, %v; want %s", who, seen, err, be.Name)
	}
	if who, seen, err := askWhoUDP(ctx, deniedPod.NS(), clusterUDP, 700*time.Millisecond); err == nil {
		t.Errorf("exclusive pod without role=client -> ClusterIP UDP: answer %q seeing %q; want none (denied by %s)", who, seen, policyName)
	}

	after := policyCounts(t, ctx, n0, policyName)
	if after.policyDenied <= before.policyDenied {
		t.Errorf("denied ingress verdicts of %s: %d before, %d after the denied clients; want more", policyName, before.policyDenied, after.policyDenied)
	}
	if after.dropFromPod <= before.dropFromPod {
		t.Errorf("drop_policy from-pod: %d before, %d after the denied exclusive pod; want more", before.dropFromPod, after.dropFromPod)
	}
	if after.dropFromNetdev <= before.dropFromNetdev {
		t.Errorf("drop_policy from-netdev: %d before, %d after the denied external client; want more", before.dropFromNetdev, after.dropFromNetdev)
	}
}

// dialWhoFrom is dialWho from src (the namespace's own choice when src is invalid).
func dialWhoFrom(ctx context.Context, ns netns.NsHandle, src netip.Addr, addr string, timeout time.Duration) (who, seen string, err error) {
	if !src.IsValid() {
		return dialWho(ctx, ns, addr, timeout)
	}
	var c net.Conn
	err = nsutil.Do(ns, func() (err error) {
		d := &net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
		c, err = d.DialContext(ctx, "tcp4", addr)
		return err
	})
	if err != nil {
		return "", "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(answerBudget))
	buf := make([]byte, 256)
	n, err := c.Read(buf)
	if err != nil {
		return "", "", err
	}
	f := strings.Fields(string(buf[:n]))
	if len(f) != 2 {
		return "", "", errors.New("answer is " + strconv.Quote(string(buf[:n])))
	}
	return f[0], f[1], nil
}

// policyDenials is what a node's /metrics says about ingress denials.
type policyDenials struct {
	policyDenied   uint64 // tern_policy_verdict_packets_total, the policy's denied ingress
	dropFromPod    uint64 // tern_datapath_packets_total drop_policy from-pod
	dropFromNetdev uint64 // tern_datapath_packets_total drop_policy from-netdev
}

func policyCounts(t *testing.T, ctx context.Context, n *lab.Node, policy string) policyDenials {
	t.Helper()
	text, err := n.Client().Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var d policyDenials
	for _, line := range strings.Split(text, "\n") {
		name, value, ok := strings.Cut(line, " ")
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		var dst *uint64
		switch {
		case strings.HasPrefix(name, "tern_policy_verdict_packets_total{") && strings.Contains(name, `direction="ingress"`) &&
			strings.Contains(name, `policy="`+policy+`"`) && strings.Contains(name, `verdict="denied"`):
			dst = &d.policyDenied
		case strings.HasPrefix(name, "tern_datapath_packets_total{") && strings.Contains(name, `reason="drop_policy"`) &&
			strings.Contains(name, `direction="from-pod"`):
			dst = &d.dropFromPod
		case strings.HasPrefix(name, "tern_datapath_packets_total{") && strings.Contains(name, `reason="drop_policy"`) &&
			strings.Contains(name, `direction="from-netdev"`):
			dst = &d.dropFromNetdev
		default:
			continue
		}
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		*dst = uint64(v)
	}
	return d
}

// TestExclusiveFlagRestoredAtAgentStart: an agent that starts over the pinned maps of a
// running exclusive-ENI pod whose ipcache entry lacks IPC_F_EXCLUSIVE (written by an agent
// from before the flag) sets it at start, without Kubernetes (nothing else rewrites the entry
// until the pod's next attach): Service flows to the pod need it to be translated to the node.
func TestExclusiveFlagRestoredAtAgentStart(t *testing.T) {
	l := up(t, lab.Options{Nodes: 1, AgentConfig: func(n *lab.Node, c *agent.Config) {
		c.NodeLabels = map[string]string{ipam.LabelExclusiveENI: ipam.LabelExclusiveENIOnly}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	n := l.Node(0)
	ex, err := l.AddPodAnnotated(ctx, 0, "excl", "ex", map[string]string{ipam.AnnotationENI: "true"})
	if err != nil {
		t.Fatal(err)
	}
	checkExclusivePod(t, l, ctx, ex)
	key := loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(ex.IP)}
	flags := func() uint16 {
		t.Helper()
		m, err := loader.OpenPinnedMaps(n.PinRoot())
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		var v loader.IPCacheValue
		if err := m.IPCache.Lookup(key, &v); err != nil {
			t.Fatalf("ipcache entry of %s: %v", ex.IP, err)
		}
		return v.Flags
	}
	if f := flags(); f&loader.IPCacheFlagExclusive == 0 {
		t.Fatalf("ipcache entry of the exclusive pod %s has flags %#x, want IPCacheFlagExclusive", ex.IP, f)
	}
	if err := n.StopAgent(); err != nil {
		t.Fatal(err)
	}
	// What an older agent left: the entry without the flag.
	ipc, err := ebpf.LoadPinnedMap(filepath.Join(n.PinRoot(), loader.PodMapTernIpcache), nil)
	if err != nil {
		t.Fatal(err)
	}
	var v loader.IPCacheValue
	if err := ipc.Lookup(key, &v); err != nil {
		t.Fatal(err)
	}
	v.Flags &^= loader.IPCacheFlagExclusive | loader.IPCacheFlagPolicy
	if err := ipc.Put(key, v); err != nil {
		t.Fatal(err)
	}
	ipc.Close()
	if err := n.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; {
		f := flags()
		if f&loader.IPCacheFlagExclusive != 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("30s after the agent's start the exclusive pod's ipcache entry has flags %#x, want IPCacheFlagExclusive", f)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := l.DeletePod(ctx, ex); err != nil {
		t.Fatal(err)
	}
}
