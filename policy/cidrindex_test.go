package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// ipBlockState is one pod selected by `policies` policies, each allowing ingress from
// `perPolicy` distinct /32 ipBlocks (policies*perPolicy prefixes in all), plus one policy
// allowing 10.0.0.0/8 except 10.1.0.0/16 and 10.2.3.0/24.
func ipBlockState(policies, perPolicy int) State {
	st := State{
		Namespaces: []corev1.Namespace{{ObjectMeta: metav1.ObjectMeta{Name: "ns"}}},
		Pods: []corev1.Pod{{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web", Labels: map[string]string{"app": "web"}},
			Status: corev1.PodStatus{PodIP: "192.168.0.10"}}},
	}
	sel := metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}
	n := 0
	for i := range policies {
		var peers []networkingv1.NetworkPolicyPeer
		for range perPolicy {
			a := netip.AddrFrom4([4]byte{10, byte(n >> 16), byte(n >> 8), byte(n)})
			peers = append(peers, networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: a.String() + "/32"}})
			n++
		}
		st.Policies = append(st.Policies, networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: fmt.Sprintf("blocks-%03d", i)},
			Spec: networkingv1.NetworkPolicySpec{PodSelector: sel, Ingress: []networkingv1.NetworkPolicyIngressRule{{From: peers}}}})
	}
	st.Policies = append(st.Policies, networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "wide"},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: sel, Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
			{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/8", Except: []string{"10.1.0.0/16", "10.2.3.0/24"}}}}}}}})
	return st
}

// 17,000 ipBlock prefixes (the default tern_policy_cidrs holds 16,384) compile with work
// linear in the prefixes: resolving every ipBlock peer visits each prefix a bounded number
// of times. Before the index every peer tested every prefix: 17,000 x 17,000 tests, over
// 90 s on a loaded node. The bound is on the work, not on time.
func TestLargeIPBlockCompileIsLinear(t *testing.T) {
	const policies, perPolicy = 170, 100
	st := ipBlockState(policies, perPolicy)
	c, d, err := CompileIncremental(st)
	if err != nil {
		t.Fatal(err)
	}
	prefixes := policies*perPolicy + 3 // the /32s, the /8 and its two excepts
	if len(d.CIDRs) != prefixes {
		t.Fatalf("%d prefixes in tern_policy_cidrs, want %d", len(d.CIDRs), prefixes)
	}
	// Each /32 peer visits its own entry; the /8 visits every entry once.
	if max := 2 * prefixes; c.index.scanned > max {
		t.Fatalf("resolving the ipBlock peers visited %d prefixes, want at most %d (2 per prefix)", c.index.scanned, max)
	}
	t.Logf("%d prefixes, %d visited, %d rules", prefixes, c.index.scanned, len(d.Rules))

	// The answers are those of the whole compiler, and the excepts hold.
	full, err := Compile(st)
	if err != nil {
		t.Fatal(err)
	}
	if len(full.Rules) != len(d.Rules) {
		t.Fatalf("incremental %d rules, whole %d", len(d.Rules), len(full.Rules))
	}
	web := netip.MustParseAddr("192.168.0.10")
	for _, tc := range []struct {
		from    string
		allowed bool
	}{
		{"10.0.0.5", true},    // a /32 of blocks-000, also inside the /8
		{"10.0.66.103", true}, // the last /32 (16,999 = 0x4267), also inside the /8
		{"10.1.2.3", false},   // inside the /8 but in an except (and no /32 of its own)
		{"10.2.3.4", false},   // the other except
		{"10.2.4.4", true},    // the /8 only
		{"11.0.0.1", false},   // outside everything
	} {
		_, in := d.Decide(netip.MustParseAddr(tc.from), web, 6, 80)
		if in != tc.allowed {
			t.Errorf("%s -> web: allowed %v, want %v", tc.from, in, tc.allowed)
		}
	}
}

// A Compiler told the map's capacity refuses a state that names more prefixes before it
// compiles any rule, and compiles the pending changes once policies are deleted to fit.
func TestCIDROverflowFailsFast(t *testing.T) {
	const policies, perPolicy = 170, 100
	st := ipBlockState(policies, perPolicy)
	c := NewCompiler([]netip.Addr{netip.MustParseAddr("192.168.0.1")})
	c.SetCIDRCapacity(16384)
	for i := range st.Namespaces {
		c.SetNamespace(&st.Namespaces[i])
	}
	for i := range st.Pods {
		c.SetPod(&st.Pods[i])
	}
	for i := range st.Policies {
		c.SetPolicy(&st.Policies[i])
	}
	_, err := c.Desired()
	var oe *CIDROverflowError
	if !errors.As(err, &oe) || !errors.Is(err, ErrTooManyCIDRs) {
		t.Fatalf("Desired with %d prefixes for 16,384: %v, want a CIDROverflowError", policies*perPolicy+3, err)
	}
	if want := policies*perPolicy + 3 + 1; oe.Prefixes != want || oe.Capacity != 16384 {
		t.Fatalf("overflow says %d prefixes for %d, want %d for 16384", oe.Prefixes, oe.Capacity, want)
	}
	if c.Recompiled() != 0 || c.index.scanned != 0 {
		t.Fatalf("an overflowing Desired compiled %d policies and visited %d prefixes, want none", c.Recompiled(), c.index.scanned)
	}
	t.Logf("refused: %v", err)

	// Delete 10 policies (1,000 prefixes): 16,004 fit.
	for i := range 10 {
		c.DeletePolicy(types.NamespacedName{Namespace: "ns", Name: fmt.Sprintf("blocks-%03d", i)})
	}
	d, err := c.Desired()
	if err != nil {
		t.Fatalf("Desired after deleting to fit: %v", err)
	}
	if want := (policies-10)*perPolicy + 3 + 1; len(d.CIDRs) != want {
		t.Fatalf("%d prefixes after deleting to fit, want %d", len(d.CIDRs), want)
	}
	web := netip.MustParseAddr("192.168.0.10")
	if _, in := d.Decide(netip.MustParseAddr("10.0.4.0"), web, 6, 80); !in { // /32 number 1,024: blocks-010
		t.Fatal("a kept policy's /32 is not allowed after the overflow cleared")
	}
}

// BenchmarkCompile17000IPBlocks is the whole compile of ipBlockState(170, 100).
func BenchmarkCompile17000IPBlocks(b *testing.B) {
	st := ipBlockState(170, 100)
	for b.Loop() {
		if _, err := Compile(st); err != nil {
			b.Fatal(err)
		}
	}
}
