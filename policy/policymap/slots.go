package policymap

import (
	"fmt"
	"sort"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/loader"
)

// Slots gives every NetworkPolicy a small number for as long as it exists: the datapath
// counts verdicts per slot (tern_policy_stats) and names the deciding policy by it in
// events. Why not the policy's index in the compiler's sorted list: that shifts whenever a
// policy is added before it, and the counters would change owner. The names live in the
// pinned tern_policy_names, so an agent restart keeps every slot (and its counters) and
// ternctl names slots with the agent down.
//
// Slot 0 is "unknown": a policy gets it when all PolicySlots-1 slots are taken.
type Slots struct {
	names  *ebpf.Map
	stats  *ebpf.Map
	byName map[string]uint32
	byNum  map[uint32]string
}

// NewSlots starts from what tern_policy_names holds.
func NewSlots(m *loader.PolicyMaps) (*Slots, error) {
	s := &Slots{names: m.Names, stats: m.Stats, byName: map[string]uint32{}, byNum: map[uint32]string{}}
	var (
		k uint32
		v loader.PolicyName
	)
	it := m.Names.Iterate()
	for it.Next(&k, &v) {
		s.byName[v.String()] = k
		s.byNum[k] = v.String()
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", loader.PodMapTernPolicyNames, err)
	}
	return s, nil
}

// Assign gives a slot to every policy of names ("namespace/name") that has none: the
// lowest free one, its counters zeroed and its name written before any rule refers to it.
func (s *Slots) Assign(names []string) error {
	next := uint32(1)
	sorted := append([]string(nil), names...)
	sort.Strings(sorted)
	for _, n := range sorted {
		if _, ok := s.byName[n]; ok {
			continue
		}
		for next < loader.PolicySlots && s.byNum[next] != "" {
			next++
		}
		if next >= loader.PolicySlots {
			return nil // the rest count under slot 0
		}
		if err := loader.ZeroPolicyStats(s.stats, next); err != nil {
			return err
		}
		if err := s.names.Put(next, loader.NewPolicyName(n)); err != nil {
			return fmt.Errorf("write policy %s as slot %d into %s: %w", n, next, loader.PodMapTernPolicyNames, err)
		}
		s.byName[n] = next
		s.byNum[next] = n
	}
	return nil
}

// Release frees the slots of policies not in names (after no rule refers to them).
func (s *Slots) Release(names []string) error {
	keep := make(map[string]bool, len(names))
	for _, n := range names {
		keep[n] = true
	}
	for n, k := range s.byName {
		if keep[n] {
			continue
		}
		if err := s.names.Delete(k); err != nil && !loader.IsNotExist(err) {
			return fmt.Errorf("delete slot %d (%s) from %s: %w", k, n, loader.PodMapTernPolicyNames, err)
		}
		delete(s.byName, n)
		delete(s.byNum, k)
	}
	return nil
}

// Of is the slot of a policy ("namespace/name"), 0 if it has none.
func (s *Slots) Of(name string) uint32 { return s.byName[name] }

// Name is the policy a slot names, "" if none.
func (s *Slots) Name(slot uint32) string { return s.byNum[slot] }
