package policy_test

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policytest"
)

// The compiler's map contents, read the way the datapath reads them (policy.Desired.Decide),
// agree with the reference evaluator on every probe of 300 random scenarios.
func TestCompilerAgreesWithReference(t *testing.T) {
	probes := 0
	for seed := uint64(1); seed <= 300; seed++ {
		sc := policytest.Random(seed, 40)
		d, err := policy.Compile(sc.State)
		if err != nil {
			t.Fatalf("seed %d: compile: %v", seed, err)
		}
		want, err := policytest.Reference(&sc)
		if err != nil {
			t.Fatal(err)
		}
		for i, p := range sc.Probes {
			src, _ := policytest.Resolve(&sc.State, p.From)
			dst, _ := policytest.Resolve(&sc.State, p.To)
			eg, in := d.Decide(src.Addr, dst.Addr, policy.ProtoNumber(corev1.Protocol(p.Protocol)), p.Port)
			if eg != want[i].Egress || in != want[i].Ingress {
				t.Fatalf("seed %d probe %d %+v: compiled egress=%v ingress=%v, reference egress=%v ingress=%v",
					seed, i, p, eg, in, want[i].Egress, want[i].Ingress)
			}
			probes++
		}
	}
	t.Logf("%d probes agree", probes)
}

func TestPortBlocks(t *testing.T) {
	for _, c := range []struct{ lo, hi uint16 }{{1, 65535}, {8000, 8100}, {80, 80}, {0, 65535}, {1023, 1025}, {65535, 65535}} {
		blocks := policy.PortBlocks(c.lo, c.hi)
		if len(blocks) > 32 {
			t.Fatalf("%d-%d: %d blocks", c.lo, c.hi, len(blocks))
		}
		for p := 0; p <= 65535; p++ {
			in := false
			for _, b := range blocks {
				k := policy.RuleKey{Proto: 6, Port: b.Port, PortBits: b.Bits}
				if k.Covers(6, uint16(p)) {
					in = true
				}
			}
			if in != (p >= int(c.lo) && p <= int(c.hi)) {
				t.Fatalf("%d-%d: port %d covered=%v", c.lo, c.hi, p, in)
			}
		}
	}
}

func pod(ns, name, ip string, l map[string]string, ports ...corev1.ContainerPort) corev1.Pod {
	p := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: l}}
	p.Spec.Containers = []corev1.Container{{Name: "c", Ports: ports}}
	p.Status.PodIP = ip
	return p
}

// A named port that resolves to different numbers on pods with the same labels: each pod
// is reachable on its own number only, for ingress and egress.
func TestNamedPortPerPod(t *testing.T) {
	web := map[string]string{"app": "web"}
	http := func(n int32) corev1.ContainerPort { return corev1.ContainerPort{Name: "http", ContainerPort: n} }
	port := intstr.FromString("http")
	st := policy.State{
		Pods: []corev1.Pod{pod("a", "w80", "10.0.0.1", web, http(80)), pod("a", "w8080", "10.0.0.2", web, http(8080)),
			pod("a", "client", "10.0.0.3", map[string]string{"app": "client"})},
		Policies: []networkingv1.NetworkPolicy{
			{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "in"}, Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: web},
				Ingress:     []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: &port}}}}}},
			{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "out"}, Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
				Egress:      []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: &port}}}}}},
		},
	}
	d, err := policy.Compile(st)
	if err != nil {
		t.Fatal(err)
	}
	c := netip.MustParseAddr("10.0.0.3")
	for _, tc := range []struct {
		dst  string
		port uint16
		want bool
	}{{"10.0.0.1", 80, true}, {"10.0.0.1", 8080, false}, {"10.0.0.2", 8080, true}, {"10.0.0.2", 80, false}} {
		eg, in := d.Decide(c, netip.MustParseAddr(tc.dst), 6, tc.port)
		if eg != tc.want || in != tc.want {
			t.Errorf("client -> %s:%d egress=%v ingress=%v, want %v", tc.dst, tc.port, eg, in, tc.want)
		}
	}
}

// Invalid objects are reported together, each with the field at fault.
func TestCompileErrorsNameTheField(t *testing.T) {
	bad := networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "bad"}, Spec: networkingv1.NetworkPolicySpec{
		Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/33"}}}}},
		Egress:  []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/8", Except: []string{"x"}}}}}},
	}}
	_, err := policy.Compile(policy.State{Policies: []networkingv1.NetworkPolicy{bad}})
	if err == nil {
		t.Fatal("compile accepted bad CIDRs")
	}
	for _, want := range []string{"a/bad", "spec.ingress[0].from[0].ipBlock.cidr", "spec.egress[0].to[0].ipBlock.except[0]"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %q", err, want)
		}
	}
}

// Identities are a function of the pod shape: the same cluster listed in another order
// gets the same numbers (every node agrees).
func TestIdentitiesAreDeterministic(t *testing.T) {
	sc := policytest.Random(7, 0)
	a, err := policy.Compile(sc.State)
	if err != nil {
		t.Fatal(err)
	}
	st := sc.State
	st.Pods = append([]corev1.Pod(nil), st.Pods...)
	rand.Shuffle(len(st.Pods), func(i, j int) { st.Pods[i], st.Pods[j] = st.Pods[j], st.Pods[i] })
	b, err := policy.Compile(st)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(a.PodIdentity) != fmt.Sprint(b.PodIdentity) || len(a.Rules) != len(b.Rules) {
		t.Fatalf("identities differ with pod order:\n%v\n%v", a.PodIdentity, b.PodIdentity)
	}
}

// With errors, what Compile returns is still safe: a peer with an unreadable except allows
// nothing (not the whole cidr), the policy still isolates, and an IPv6 ipBlock (valid, but
// holding no IPv4 address) is no error and matches nothing.
func TestCompileErrorsFailClosed(t *testing.T) {
	web := map[string]string{"app": "web"}
	st := policy.State{
		Pods: []corev1.Pod{pod("a", "web", "10.0.0.1", web)},
		Policies: []networkingv1.NetworkPolicy{{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "p"}, Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: web},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
				{IPBlock: &networkingv1.IPBlock{CIDR: "192.168.0.0/16", Except: []string{"192.168.1.0/24", "bogus"}}},
				{IPBlock: &networkingv1.IPBlock{CIDR: "fd00::/8"}},
			}}}}}},
	}
	d, err := policy.Compile(st)
	if err == nil || !strings.Contains(err.Error(), "except[1]") || strings.Contains(err.Error(), "fd00") {
		t.Fatalf("error %v: want one about except[1] only", err)
	}
	for _, src := range []string{"192.168.2.2", "192.168.1.1", "8.8.8.8"} {
		if _, in := d.Decide(netip.MustParseAddr(src), netip.MustParseAddr("10.0.0.1"), 6, 80); in {
			t.Errorf("%s -> web allowed by a peer with an unreadable except", src)
		}
	}
}

// An egress rule with a named port and an ipBlock peer: the name resolves on each
// destination pod inside the block (its own number), an address that is not a pod has no
// named ports, and pods outside the block or in an except get nothing. The compiled maps
// and the reference evaluator agree.
func TestEgressNamedPortOnIPBlock(t *testing.T) {
	web := map[string]string{"app": "web"}
	http := func(n int32) corev1.ContainerPort { return corev1.ContainerPort{Name: "http", ContainerPort: n} }
	port := intstr.FromString("http")
	st := policy.State{
		Pods: []corev1.Pod{pod("a", "w80", "10.0.0.1", web, http(80)), pod("a", "w8080", "10.0.0.2", web, http(8080)),
			pod("a", "client", "10.0.0.3", map[string]string{"app": "client"}), pod("a", "plain", "10.0.0.4", web),
			pod("b", "excepted", "10.0.0.200", web, http(80)), pod("b", "outside", "10.1.0.1", web, http(80))},
		Policies: []networkingv1.NetworkPolicy{{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "out"}, Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress: []networkingv1.NetworkPolicyEgressRule{{
				To:    []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/16", Except: []string{"10.0.0.128/25"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: &port}}}}}}},
	}
	d, err := policy.Compile(st)
	if err != nil {
		t.Fatal(err)
	}
	sc := policytest.Scenario{State: st}
	for _, tc := range []struct {
		dst  string
		port uint16
		want bool
	}{{"10.0.0.1", 80, true}, {"10.0.0.1", 8080, false}, {"10.0.0.2", 8080, true}, {"10.0.0.2", 80, false},
		{"10.0.0.4", 80, false}, {"10.0.0.200", 80, false}, {"10.0.5.5", 80, false}, {"10.1.0.1", 80, false}} {
		eg, _ := d.Decide(netip.MustParseAddr("10.0.0.3"), netip.MustParseAddr(tc.dst), 6, tc.port)
		if eg != tc.want {
			t.Errorf("client -> %s:%d egress=%v, want %v", tc.dst, tc.port, eg, tc.want)
		}
		sc.Probes = append(sc.Probes, policytest.Probe{From: "a/client", To: tc.dst, Port: tc.port, Protocol: "TCP"})
	}
	ref, err := policytest.Reference(&sc)
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range sc.Probes {
		eg, _ := d.Decide(netip.MustParseAddr("10.0.0.3"), netip.MustParseAddr(p.To), 6, p.Port)
		if ref[i].Egress != eg {
			t.Errorf("%+v: reference egress %v, compiled %v", p, ref[i].Egress, eg)
		}
	}
}
