package policymap_test

import (
	"testing"

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

// Slots stay with their policy: a new policy takes the lowest free slot with zeroed
// counters, a deleted one frees its slot, and a new Slots (an agent restart) reads them back
// from the pinned names.
func TestSlotsAreStable(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.PolicyMaps()
	s, err := policymap.NewSlots(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Assign([]string{"b/two", "a/one"}); err != nil {
		t.Fatal(err)
	}
	if s.Of("a/one") != 1 || s.Of("b/two") != 2 {
		t.Fatalf("slots a/one %d b/two %d, want 1 and 2", s.Of("a/one"), s.Of("b/two"))
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
	if err := s.Release([]string{"b/two"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Assign([]string{"b/two", "c/three"}); err != nil {
		t.Fatal(err)
	}
	if s.Of("c/three") != 1 || s.Of("b/two") != 2 || s.Of("a/one") != 0 {
		t.Fatalf("after a/one left: c/three %d b/two %d a/one %d", s.Of("c/three"), s.Of("b/two"), s.Of("a/one"))
	}
	if c, err := loader.ReadPolicyStats(m.Stats, 1, 1); err != nil || c != (loader.PolicyCounters{}) {
		t.Fatalf("slot 1 given to c/three kept counts %+v (%v)", c, err)
	}
	again, err := policymap.NewSlots(m)
	if err != nil {
		t.Fatal(err)
	}
	if again.Of("c/three") != 1 || again.Of("b/two") != 2 || again.Name(2) != "b/two" {
		t.Fatalf("slots read back: c/three %d b/two %d", again.Of("c/three"), again.Of("b/two"))
	}
}
