package loader_test

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policymap"
)

// skbIngressIfindexOff is the offset of ingress_ifindex in struct __sk_buff (UAPI, fixed).
// BPF_PROG_TEST_RUN takes it from the context; 0 means "from the host stack".
const (
	skbCtxSize           = 192
	skbIngressIfindexOff = 36
)

// runFrom runs prog on frame as if it arrived from interface ingress (0: the host stack).
func runFrom(t *testing.T, prog *ebpf.Program, frame []byte, ingress uint32) uint32 {
	t.Helper()
	ctx := make([]byte, skbCtxSize)
	ctx[skbIngressIfindexOff] = byte(ingress)
	opts := &ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+256), Context: ctx}
	ret, err := prog.Run(opts)
	if err != nil {
		t.Fatalf("test run: %v", err)
	}
	return ret
}

var (
	webIP    = netip.MustParseAddr("10.0.0.1")
	clientIP = netip.MustParseAddr("10.0.0.2")
	otherIP  = netip.MustParseAddr("10.0.0.3")
	nodeIP   = netip.MustParseAddr("192.168.0.100")
	vipWeb   = netip.MustParseAddr("10.96.0.10")
	vipOther = netip.MustParseAddr("10.96.0.20")
)

func npod(name string, ip netip.Addr, app string, ports ...corev1.ContainerPort) corev1.Pod {
	p := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: name, Labels: map[string]string{"app": app}}}
	p.Spec.Containers = []corev1.Container{{Name: "c", Ports: ports}}
	p.Status.PodIP = ip.String()
	return p
}

// policyState: web takes client on its named port "http" (8080) and 172.16.0.0/12 except
// 172.16.5.0/24 on UDP 8000-8100, and sends nothing (egress default deny); client sends
// only to web on TCP 8080.
func policyState(webIngress bool) policy.State {
	http := intstr.FromString("http")
	p8080 := intstr.FromInt32(8080)
	p8000 := intstr.FromInt32(8000)
	end := int32(8100)
	udp := corev1.ProtocolUDP
	web := networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "web"}, Spec: networkingv1.NetworkPolicySpec{
		PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
		PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress},
	}}
	if webIngress {
		web.Spec.Ingress = []networkingv1.NetworkPolicyIngressRule{
			{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: &http}}},
			{From: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "172.16.0.0/12", Except: []string{"172.16.5.0/24"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &udp, Port: &p8000, EndPort: &end}}},
		}
	}
	client := networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "client"}, Spec: networkingv1.NetworkPolicySpec{
		PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}},
		PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
		Egress: []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}}},
			Ports: []networkingv1.NetworkPolicyPort{{Port: &p8080}}}},
	}}
	return policy.State{
		Pods: []corev1.Pod{npod("web", webIP, "web", corev1.ContainerPort{Name: "http", ContainerPort: 8080}),
			npod("client", clientIP, "client"), npod("other", otherIP, "other")},
		Policies:  []networkingv1.NetworkPolicy{web, client},
		NodeAddrs: []netip.Addr{nodeIP},
	}
}

type policyDP struct {
	d       *loader.Datapath
	w       *policymap.Writer
	desired *policy.Desired
}

func newPolicyDP(t *testing.T) *policyDP { return newPolicyDPWith(t, loader.Config{}) }

func newPolicyDPWith(t *testing.T, cfg loader.Config) *policyDP {
	d := loadertest.New(t, cfg)
	w, err := policymap.NewWriter(d.PolicyMaps())
	if err != nil {
		t.Fatal(err)
	}
	pd := &policyDP{d: d, w: w}
	pd.sync(t, policyState(true), nil)
	loadertest.PutService(t, d.Maps(), 1, vipWeb.String(), 80, packet.ProtoTCP, loadertest.B(webIP.String(), 8080))
	loadertest.PutService(t, d.Maps(), 2, vipOther.String(), 80, packet.ProtoTCP, loadertest.B(otherIP.String(), 80))
	return pd
}

func (pd *policyDP) sync(t *testing.T, st policy.State, audit func(policy.Identity) bool) {
	t.Helper()
	desired, err := policy.Compile(st)
	if err != nil {
		t.Fatal(err)
	}
	pd.desired = desired
	if _, err := pd.w.Sync(policymap.Encode(desired, policymap.Options{Audit: audit})); err != nil {
		t.Fatal(err)
	}
	for a, v := range policymap.IPCache(desired) {
		if err := pd.d.Maps().PutIPCache(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(a)}, v); err != nil {
			t.Fatal(err)
		}
	}
}

// as makes the program's interface (ifindex 1 in a test run) the endpoint of the pod at
// addr, with enforcement on or off.
func (pd *policyDP) as(t *testing.T, addr netip.Addr, enforce bool) {
	t.Helper()
	v := loader.EndpointValue{Addr: loader.AddrToBE(addr), Identity: uint32(pd.desired.IPCache[addr])}
	if enforce {
		v.Flags = loader.EndpointFlagPolicy
	}
	if err := pd.d.Maps().PutEndpoint(loader.EndpointKey{Ifindex: 1}, v); err != nil {
		t.Fatal(err)
	}
}

type policyRow struct {
	desc    string
	pod     netip.Addr // the endpoint the program serves
	from    bool       // tern_from_pod (else tern_to_pod)
	frame   packet.Frame
	ingress uint32 // to-pod: the interface it came from (0: the host stack)
	want    uint32
}

func (pd *policyDP) run(t *testing.T, rows []policyRow) {
	t.Helper()
	for _, r := range rows {
		pd.as(t, r.pod, true)
		prog := pd.d.ToPod()
		if r.from {
			prog = pd.d.FromPod()
		}
		if got := runFrom(t, prog, r.frame.Build(), r.ingress); got != r.want {
			t.Errorf("%s: verdict %d, want %d", r.desc, got, r.want)
		}
	}
}

const remote = 5 // an ingress interface that is not the host stack

func TestPolicyVerdicts(t *testing.T) {
	pd := newPolicyDP(t)
	ext := func(a string) netip.Addr { return netip.MustParseAddr(a) }
	pd.run(t, []policyRow{
		{"client -> web on its named port", webIP, false, tcp(clientIP, 40000, webIP, 8080, packet.SYN), remote, verdictOK},
		{"other -> web: not a selected peer", webIP, false, tcp(otherIP, 40000, webIP, 8080, packet.SYN), remote, verdictShot},
		{"client -> web on another port", webIP, false, tcp(clientIP, 40001, webIP, 9090, packet.SYN), remote, verdictShot},
		{"client -> web on UDP 8080: the named port is TCP", webIP, false, udp(clientIP, 40002, webIP, 8080, "x"), remote, verdictShot},
		{"ipBlock, inside the range", webIP, false, udp(ext("172.16.1.1"), 5000, webIP, 8050, "x"), remote, verdictOK},
		{"ipBlock, range start", webIP, false, udp(ext("172.16.1.1"), 5001, webIP, 8000, "x"), remote, verdictOK},
		{"ipBlock, past the range end", webIP, false, udp(ext("172.16.1.1"), 5002, webIP, 8101, "x"), remote, verdictShot},
		{"ipBlock except", webIP, false, udp(ext("172.16.5.1"), 5003, webIP, 8050, "x"), remote, verdictShot},
		{"ipBlock, outside the cidr", webIP, false, udp(ext("8.8.8.8"), 5004, webIP, 8050, "x"), remote, verdictShot},
		{"from the node's stack (kubelet probe)", webIP, false, tcp(nodeIP, 40003, webIP, 22, packet.SYN), 0, verdictOK},
		{"web sends: egress default deny", webIP, true, tcp(webIP, 40004, otherIP, 80, packet.SYN), 0, verdictShot},
		{"web -> its node: always allowed", webIP, true, tcp(webIP, 40005, nodeIP, 10250, packet.SYN), 0, verdictOK},
		{"web -> itself", webIP, true, tcp(webIP, 40006, webIP, 8080, packet.SYN), 0, verdictOK},
		{"client -> web:8080", clientIP, true, tcp(clientIP, 41000, webIP, 8080, packet.SYN), 0, verdictOK},
		{"client -> other:80", clientIP, true, tcp(clientIP, 41001, otherIP, 80, packet.SYN), 0, verdictShot},
		{"client -> web's Service: judged on the backend web:8080", clientIP, true, tcp(clientIP, 41002, vipWeb, 80, packet.SYN), 0, verdictOK},
		{"client -> other's Service: backend other:80 denied", clientIP, true, tcp(clientIP, 41003, vipOther, 80, packet.SYN), 0, verdictShot},
		{"other is not isolated", otherIP, true, tcp(otherIP, 42000, clientIP, 9, packet.SYN), 0, verdictOK},
	})
	m := pd.d.Maps()
	if got := loadertest.Metric(t, m, loader.ReasonDropPolicy, loader.DirToPod); got != 6 {
		t.Errorf("drop_policy to-pod counted %d, want 6", got)
	}
	if got := loadertest.Metric(t, m, loader.ReasonDropPolicy, loader.DirFromPod); got != 3 {
		t.Errorf("drop_policy from-pod counted %d, want 3", got)
	}
	// A denied packet opened no flow.
	ct, err := m.DumpCT()
	if err != nil {
		t.Fatal(err)
	}
	for k := range ct {
		if pa, pb := loader.BEToPort(k.PortA), loader.BEToPort(k.PortB); pa == 40004 || pa == 41001 || pa == 40001 ||
			pb == 40004 || pb == 41001 || pb == 40001 {
			t.Errorf("a denied packet left a conntrack entry %+v", k)
		}
	}
}

// Replies of an allowed flow pass with no policy lookup: web's egress denies everything,
// yet it answers client; and once cached, the flow outlives the rule that allowed it,
// while a new connection does not.
func TestPolicyVerdictCachedInConntrack(t *testing.T) {
	pd := newPolicyDP(t)
	pd.run(t, []policyRow{
		{"client SYN", webIP, false, tcp(clientIP, 40000, webIP, 8080, packet.SYN), remote, verdictOK},
		{"web's SYN-ACK: a reply, judged by web's ingress", webIP, true, tcp(webIP, 8080, clientIP, 40000, packet.SYN|packet.ACK), 0, verdictOK},
	})
	ct, err := pd.d.Maps().DumpCT()
	if err != nil {
		t.Fatal(err)
	}
	if len(ct) != 1 {
		t.Fatalf("conntrack holds %d entries, want 1", len(ct))
	}
	for _, v := range ct {
		if v.Policy != loader.CTPolicyIn {
			t.Fatalf("conntrack policy bits %#x, want CT_POL_IN", v.Policy)
		}
	}
	// The ingress rule goes; the established flow keeps its cached verdict.
	pd.sync(t, policyState(false), nil)
	pd.run(t, []policyRow{
		{"client ACK after the rule left", webIP, false, tcp(clientIP, 40000, webIP, 8080, packet.ACK), remote, verdictOK},
		{"web's data reply", webIP, true, tcp(webIP, 8080, clientIP, 40000, packet.ACK), 0, verdictOK},
		{"a new connection is judged by the new rules", webIP, false, tcp(clientIP, 40001, webIP, 8080, packet.SYN), remote, verdictShot},
		{"a new SYN on the cached tuple is judged again", webIP, false, tcp(clientIP, 40000, webIP, 8080, packet.SYN), remote, verdictShot},
	})
}

// Audit mode passes what would be dropped and counts it; enforcement off skips the stage.
func TestPolicyAuditAndOff(t *testing.T) {
	pd := newPolicyDP(t)
	pd.sync(t, policyState(true), func(policy.Identity) bool { return true })
	pd.run(t, []policyRow{
		{"other -> web, audit", webIP, false, tcp(otherIP, 40000, webIP, 8080, packet.SYN), remote, verdictOK},
		{"other -> web again, audit (not cached)", webIP, false, tcp(otherIP, 40000, webIP, 8080, packet.ACK), remote, verdictOK},
	})
	m := pd.d.Maps()
	if got := loadertest.Metric(t, m, loader.ReasonPolicyAudit, loader.DirToPod); got != 2 {
		t.Errorf("policy_audit counted %d, want 2", got)
	}
	pd.sync(t, policyState(true), nil)
	pd.as(t, webIP, false)
	if v := runFrom(t, pd.d.ToPod(), tcp(otherIP, 40001, webIP, 8080, packet.SYN).Build(), remote); v != verdictOK {
		t.Errorf("enforcement off: verdict %d, want TC_ACT_OK", v)
	}
	if got := loadertest.Metric(t, m, loader.ReasonDropPolicy, loader.DirToPod); got != 0 {
		t.Errorf("drop_policy counted %d with enforcement off and audit, want 0", got)
	}
}
