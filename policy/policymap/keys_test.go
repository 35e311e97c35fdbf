package policymap_test

import (
	"slices"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policymap"
)

// DecodeRuleKey inverts RuleKey and IsolatorKey.
func TestRuleKeyRoundTrip(t *testing.T) {
	for _, k := range []policy.RuleKey{
		{Subject: 300, Peer: 0, Dir: policy.Ingress},
		{Subject: 300, Peer: 1 << 31, Dir: policy.Egress, Proto: 6},
		{Subject: 300, Peer: 400, Dir: policy.Egress, Proto: 17, Port: 8000, PortBits: 13},
		{Subject: 300, Peer: 400, Dir: policy.Ingress, Proto: 132, Port: 8080, PortBits: 16},
	} {
		got, iso := policymap.DecodeRuleKey(policymap.RuleKey(k))
		if got != k || iso {
			t.Errorf("%+v decoded as %+v (isolator %v)", k, got, iso)
		}
	}
	got, iso := policymap.DecodeRuleKey(policymap.IsolatorKey(300, policy.Egress))
	if !iso || got.Subject != 300 || got.Dir != policy.Egress || got.Proto != 0 {
		t.Errorf("isolator key decoded as %+v (isolator %v)", got, iso)
	}
	if r := policymap.RuleView(policy.RuleKey{Dir: policy.Ingress, Proto: 17, Port: 8000, PortBits: 13}); r.Ports != "8000-8007" || r.Protocol != "UDP" {
		t.Errorf("rule view %+v", r)
	}
}

// Slots stay with their policy: the compiler gives a new policy a free index, the names map
// follows Desired.Policies (counters zeroed when a slot changes owner), a deleted policy's
// name goes, and a restarted agent's compiler (reserving what the pinned names hold) gives
// every policy its old slot back.
func TestSlotsAreStable(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.PolicyMaps()
	names, err := policymap.NewNames(m)
	if err != nil {
		t.Fatal(err)
	}
	np := func(ns, name string) *networkingv1.NetworkPolicy {
		return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	}
	c := policy.NewCompiler(nil)
	c.ReserveSlots(names.Previous())
	c.SetPolicy(np("b", "two"))
	c.SetPolicy(np("a", "one"))
	dd, err := c.Desired()
	if err != nil {
		t.Fatal(err)
	}
	if err := names.Assign(dd.Policies); err != nil {
		t.Fatal(err)
	}
	if names.Name(1) != "b/two" || names.Name(2) != "a/one" {
		t.Fatalf("slot 1 %q, slot 2 %q; want b/two and a/one", names.Name(1), names.Name(2))
	}
	// Stale counts in slot 1 from its previous owner must not reach the next one.
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	per := make([]loader.MetricsValue, cpus)
	per[0] = loader.MetricsValue{Packets: 7, Bytes: 700}
	if err := m.Stats.Put(loader.PolicyStatsIndex(1, 1, loader.PolicyVerdictDeny), per); err != nil {
		t.Fatal(err)
	}
	c.DeletePolicy(types.NamespacedName{Namespace: "b", Name: "two"})
	c.SetPolicy(np("c", "three"))
	if dd, err = c.Desired(); err != nil {
		t.Fatal(err)
	}
	if err := names.Assign(dd.Policies); err != nil {
		t.Fatal(err)
	}
	if err := names.Release(dd.Policies); err != nil {
		t.Fatal(err)
	}
	if names.Name(1) != "c/three" || names.Name(2) != "a/one" {
		t.Fatalf("after b/two left: slot 1 %q, slot 2 %q", names.Name(1), names.Name(2))
	}
	if c, err := loader.ReadPolicyStats(m.Stats, 1, 1); err != nil || c != (loader.PolicyCounters{}) {
		t.Fatalf("slot 1 given to c/three kept counts %+v (%v)", c, err)
	}
	c.DeletePolicy(types.NamespacedName{Namespace: "c", Name: "three"})
	if dd, err = c.Desired(); err != nil {
		t.Fatal(err)
	}
	if err := names.Release(dd.Policies); err != nil {
		t.Fatal(err)
	}
	if names.Name(1) != "" {
		t.Fatalf("deleted c/three still names slot 1")
	}
	// An agent restart: a new Names reads the pins, a new compiler reserves them. Policies
	// set in another order still get their slots; a new one does not take a reserved slot.
	again, err := policymap.NewNames(m)
	if err != nil {
		t.Fatal(err)
	}
	c2 := policy.NewCompiler(nil)
	c2.ReserveSlots(again.Previous())
	c2.SetPolicy(np("d", "four"))
	c2.SetPolicy(np("a", "one"))
	if dd, err = c2.Desired(); err != nil {
		t.Fatal(err)
	}
	if len(dd.Policies) < 2 || dd.Policies[1] != "a/one" || policymap.Slot(uint32(slices.Index(dd.Policies, "d/four"))) == 2 {
		t.Fatalf("after a restart: %q, want a/one at index 1 (slot 2) and d/four elsewhere", dd.Policies)
	}
}
