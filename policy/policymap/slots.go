package policymap

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/loader"
)

// Names keeps tern_policy_names equal to the compiler's slots: the policy with index i in
// policy.Desired.Policies has the datapath slot Slot(i) = i+1, the number the datapath
// counts its verdicts under (tern_policy_stats) and names it by in events. The compiler
// (policy.Compiler) keeps a policy's index for as long as the policy exists and reuses a
// deleted policy's index ("" in Policies) for a later one; a sorted position would shift
// whenever a policy is added before it, and the counters would change owner.
//
// The names are pinned, so ternctl names slots with the agent down, and a restarted agent
// hands them to its new compiler (Previous, policy.Compiler.ReserveSlots): every policy
// gets its slot — and its counters — back.
type Names struct {
	names *ebpf.Map
	stats *ebpf.Map
	byNum map[uint32]string
}

// NewNames starts from what tern_policy_names holds.
func NewNames(m *loader.PolicyMaps) (*Names, error) {
	s := &Names{names: m.Names, stats: m.Stats, byNum: map[uint32]string{}}
	var (
		k uint32
		v loader.PolicyName
	)
	it := m.Names.Iterate()
	for it.Next(&k, &v) {
		s.byNum[k] = v.String()
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", loader.PodMapTernPolicyNames, err)
	}
	return s, nil
}

// Previous is what the names map holds (at start: what the previous agent left), as
// Desired.Policies ("" for a free index): for policy.Compiler.ReserveSlots.
func (s *Names) Previous() []string {
	var out []string
	for k, n := range s.byNum {
		if k == 0 {
			continue
		}
		for uint32(len(out)) < k {
			out = append(out, "")
		}
		out[k-1] = n
	}
	return out
}

// Assign names every slot of policies (Desired.Policies) whose name the map lacks or holds
// another policy's: its counters zeroed first, so a new policy starts from 0 and never
// inherits a deleted one's. Call it before writing the rules that refer to the slots.
func (s *Names) Assign(policies []string) error {
	for i, n := range policies {
		slot := Slot(uint32(i))
		if n == "" || slot == 0 || s.byNum[slot] == n {
			continue
		}
		if err := loader.ZeroPolicyStats(s.stats, slot); err != nil {
			return err
		}
		if err := s.names.Put(slot, loader.NewPolicyName(n)); err != nil {
			return fmt.Errorf("write policy %s as slot %d into %s: %w", n, slot, loader.PodMapTernPolicyNames, err)
		}
		s.byNum[slot] = n
	}
	return nil
}

// Release deletes the names of slots policies no longer uses (deleted policies). Call it
// after the rules naming them are gone.
func (s *Names) Release(policies []string) error {
	for slot, n := range s.byNum {
		if i := int(slot) - 1; i >= 0 && i < len(policies) && policies[i] == n {
			continue
		}
		if err := s.names.Delete(slot); err != nil && !loader.IsNotExist(err) {
			return fmt.Errorf("delete slot %d (%s) from %s: %w", slot, n, loader.PodMapTernPolicyNames, err)
		}
		delete(s.byNum, slot)
	}
	return nil
}

// Name is the policy a slot names, "" if none.
func (s *Names) Name(slot uint32) string { return s.byNum[slot] }
