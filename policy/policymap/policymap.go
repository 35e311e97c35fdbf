// Package policymap encodes the compiler's output (policy.Desired) as the NetworkPolicy
// maps' keys and values (bpf/lib/policy.h) and writes them: one reconciler per map, each
// diffing what it wants against what the map holds. The model (package policy) knows
// nothing of the encoding; the loader knows nothing of Kubernetes.
package policymap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/policy"
)

// Entries is the content of the policy maps.
type Entries struct {
	Rules     map[loader.PolicyKey]loader.PolicyValue
	Isolation map[uint32]loader.PolicyIsoValue
	CIDRs     map[loader.PolicyCIDRKey]loader.PolicyCIDRValue
}

// Options filter and amend what Encode writes.
type Options struct {
	// Local tells whether an identity has a pod on this node; only those identities'
	// rules and isolation are written. Nil: every identity (the simulator).
	Local func(policy.Identity) bool
	// Audit tells whether an identity's policy is in audit mode (would-drops reported,
	// not enforced). Nil: none.
	Audit func(policy.Identity) bool
}

// be32 returns the uint32 whose in-memory bytes are v in network order (as loader.PortToBE
// does for ports).
func be32(v uint32) uint32 {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	return binary.NativeEndian.Uint32(b[:])
}

func be16(v uint16) uint16 { return loader.PortToBE(v) }

// RuleKey encodes a compiled rule as its LPM key (big-endian fields: the trie compares
// bytes in order).
func RuleKey(k policy.RuleKey) loader.PolicyKey {
	prefix := uint32(72) // subject, peer, dir: any protocol, any port
	if k.Proto != 0 {
		prefix = 80 + uint32(k.PortBits)
	}
	return loader.PolicyKey{Prefixlen: prefix, Subject: be32(uint32(k.Subject)), Peer: be32(uint32(k.Peer)),
		Dir: uint8(k.Dir), Proto: k.Proto, Port: be16(k.Port)}
}

// IsolatorKey is the tern_policy entry naming the policy that isolates subject in dir.
func IsolatorKey(subject policy.Identity, dir policy.Direction) loader.PolicyKey {
	return loader.PolicyKey{Prefixlen: 72, Subject: be32(uint32(subject)), Dir: uint8(dir) | loader.PolicyDirIsolator}
}

// DecodeRuleKey is RuleKey's inverse; isolator tells an isolator entry (Dir without the
// isolator bit in k).
func DecodeRuleKey(lk loader.PolicyKey) (k policy.RuleKey, isolator bool) {
	k = policy.RuleKey{Subject: policy.Identity(be32(lk.Subject)), Peer: policy.Identity(be32(lk.Peer)),
		Dir: policy.Direction(lk.Dir &^ loader.PolicyDirIsolator), Proto: lk.Proto, Port: be16(lk.Port)}
	if lk.Prefixlen > 80 {
		k.PortBits = uint8(lk.Prefixlen - 80)
	}
	if lk.Prefixlen <= 72 {
		k.Proto, k.Port = 0, 0
	}
	return k, lk.Dir&loader.PolicyDirIsolator != 0
}

// CIDRKey encodes a prefix of tern_policy_cidrs.
func CIDRKey(p netip.Prefix) loader.PolicyCIDRKey {
	return loader.PolicyCIDRKey{Prefixlen: uint32(p.Bits()), Addr: loader.AddrToBE(p.Masked().Addr())}
}

// Slot is the datapath's slot (tern_policy_names, tern_policy_stats, policy events) of the
// policy Desired.Policies[i]: i+1, slot 0 meaning "unknown" (also for the policies past the
// first PolicySlots-1). The compiler keeps a policy's index for its life
// (policy.Compiler), so its counters stay its own.
func Slot(i uint32) uint32 {
	if i+1 >= loader.PolicySlots {
		return 0
	}
	return i + 1
}

// Encode turns d into map contents.
func Encode(d *policy.Desired, o Options) Entries {
	local := func(id policy.Identity) bool { return o.Local == nil || o.Local(id) }
	slot := Slot
	e := Entries{
		Rules:     make(map[loader.PolicyKey]loader.PolicyValue, len(d.Rules)),
		Isolation: make(map[uint32]loader.PolicyIsoValue, len(d.Isolation)),
		CIDRs:     make(map[loader.PolicyCIDRKey]loader.PolicyCIDRValue, len(d.CIDRs)),
	}
	for k, idx := range d.Rules {
		if local(k.Subject) {
			e.Rules[RuleKey(k)] = loader.PolicyValue{Policy: slot(idx)}
		}
	}
	// The isolator entries: which policy a denial is attributed to (bpf/lib/policy.h).
	for k, idx := range d.IsolatedBy {
		if local(k.Subject) {
			e.Rules[IsolatorKey(k.Subject, k.Dir)] = loader.PolicyValue{Policy: slot(idx)}
		}
	}
	for id, flags := range d.Isolation {
		if !local(id) {
			continue
		}
		if o.Audit != nil && o.Audit(id) {
			flags |= policy.Audit
		}
		e.Isolation[uint32(id)] = loader.PolicyIsoValue{Flags: flags}
	}
	for p, id := range d.CIDRs {
		e.CIDRs[CIDRKey(p)] = loader.PolicyCIDRValue{Identity: uint32(id)}
	}
	return e
}

// mapSync keeps one map equal to the last wanted contents; it starts from what the map
// holds, so an agent restart converges without flushing.
type mapSync[K comparable, V comparable] struct {
	m   *ebpf.Map
	cur map[K]V
	// onPut and onDel, when set, see every key written or deleted (the rules' subject index).
	onPut, onDel func(K)
}

func newMapSync[K comparable, V comparable](m *ebpf.Map) (*mapSync[K, V], error) {
	s := &mapSync[K, V]{m: m, cur: map[K]V{}}
	var (
		k K
		v V
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		s.cur[k] = v
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read map %s: %w", m, err)
	}
	return s, nil
}

func (s *mapSync[K, V]) put(want map[K]V) (int, error) {
	n := 0
	for k, v := range want {
		if old, ok := s.cur[k]; ok && old == v {
			continue
		}
		if err := s.m.Put(k, v); err != nil {
			return n, fmt.Errorf("write %+v to map %s (full? see the map's size in bpf/lib/policy.h): %w", k, s.m, err)
		}
		s.cur[k] = v
		if s.onPut != nil {
			s.onPut(k)
		}
		n++
	}
	return n, nil
}

func (s *mapSync[K, V]) del(want map[K]V) (int, error) {
	n := 0
	for k := range s.cur {
		if _, ok := want[k]; ok {
			continue
		}
		if err := s.m.Delete(k); err != nil && !loader.IsNotExist(err) {
			return n, fmt.Errorf("delete %+v from map %s: %w", k, s.m, err)
		}
		delete(s.cur, k)
		if s.onDel != nil {
			s.onDel(k)
		}
		n++
	}
	return n, nil
}

// Writer reconciles the three policy maps.
type Writer struct {
	rules *mapSync[loader.PolicyKey, loader.PolicyValue]
	iso   *mapSync[uint32, loader.PolicyIsoValue]
	cidrs *mapSync[loader.PolicyCIDRKey, loader.PolicyCIDRValue]
	// bySubject indexes rules.cur by the key's subject (as encoded), for SyncSubjects.
	bySubject map[uint32]map[loader.PolicyKey]struct{}
}

// NewWriter starts from what the maps hold.
func NewWriter(m *loader.PolicyMaps) (*Writer, error) {
	var (
		w   Writer
		err error
	)
	if w.rules, err = newMapSync[loader.PolicyKey, loader.PolicyValue](m.Rules); err != nil {
		return nil, err
	}
	if w.iso, err = newMapSync[uint32, loader.PolicyIsoValue](m.Isolation); err != nil {
		return nil, err
	}
	if w.cidrs, err = newMapSync[loader.PolicyCIDRKey, loader.PolicyCIDRValue](m.CIDRs); err != nil {
		return nil, err
	}
	w.bySubject = map[uint32]map[loader.PolicyKey]struct{}{}
	for k := range w.rules.cur {
		w.index(k)
	}
	w.rules.onPut, w.rules.onDel = w.index, w.unindex
	return &w, nil
}

// Stats counts what a Sync changed.
type Stats struct{ Written, Deleted int }

// Sync makes the maps hold e. The order keeps every intermediate state no stricter than
// either end for flows the old and new contents both allow: new prefixes and rules go in
// before isolation is added, and isolation goes before the rules and prefixes it needed.
//
// When a map is full the additions cannot go first: the entries the new contents drop are
// deleted before the rest is written. Otherwise a sync that once failed on a full map left
// its partial additions in place, and every later sync — even one that needed less room,
// after policies were deleted — failed on them before reaching its deletions, for good.
// Deleting first denies early only what the new contents deny anyway.
func (w *Writer) Sync(e Entries) (Stats, error) {
	var st Stats
	add := func(n int, err error) error { st.Written += n; return err }
	rm := func(n int, err error) error { st.Deleted += n; return err }
	if err := add(w.cidrs.put(e.CIDRs)); err != nil {
		if !isFull(err) {
			return st, err
		}
		if err := rm(w.cidrs.del(e.CIDRs)); err != nil {
			return st, err
		}
		if err := add(w.cidrs.put(e.CIDRs)); err != nil {
			return st, err
		}
	}
	if err := add(w.rules.put(e.Rules)); err != nil {
		if !isFull(err) {
			return st, err
		}
		if err := rm(w.rules.del(e.Rules)); err != nil {
			return st, err
		}
		if err := add(w.rules.put(e.Rules)); err != nil {
			return st, err
		}
	}
	if err := add(w.iso.put(e.Isolation)); err != nil {
		return st, err
	}
	if err := rm(w.iso.del(e.Isolation)); err != nil {
		return st, err
	}
	if err := rm(w.rules.del(e.Rules)); err != nil {
		return st, err
	}
	return st, rm(w.cidrs.del(e.CIDRs))
}

// isFull reports whether err is a kernel map's answer to an update when full: E2BIG from a
// hash map, ENOSPC from an LPM trie.
func isFull(err error) bool { return errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOSPC) }

// SyncSubjects is Sync for a change whose rule entries are confined to some subject
// identities (policy.Compiler.TakeTouched, and the identities that became or stopped being
// local): the isolation and ipBlock maps are diffed whole (one entry per identity or
// prefix), tern_policy only for those subjects, so a change costs what it changed, not the
// size of the maps. rulesOf gives a subject's entries (policy.Compiler.RulesOf); their
// values are d.Rules'. The maps must already hold a full Sync's contents.
func (w *Writer) SyncSubjects(d *policy.Desired, rulesOf func(policy.Identity) map[policy.RuleKey]struct{},
	subjects map[policy.Identity]bool, o Options) (Stats, error) {
	local := func(id policy.Identity) bool { return o.Local == nil || o.Local(id) }
	slot := Slot
	small := Encode(&policy.Desired{Isolation: d.Isolation, CIDRs: d.CIDRs}, o)
	want := map[loader.PolicyKey]loader.PolicyValue{}
	var gone []loader.PolicyKey
	for id := range subjects {
		if local(id) {
			for k := range rulesOf(id) {
				want[RuleKey(k)] = loader.PolicyValue{Policy: slot(d.Rules[k])}
			}
			for _, dir := range []policy.Direction{policy.Ingress, policy.Egress} {
				if idx, ok := d.IsolatedBy[policy.IsolationKey{Subject: id, Dir: dir}]; ok {
					want[IsolatorKey(id, dir)] = loader.PolicyValue{Policy: slot(idx)}
				}
			}
		}
		for k := range w.bySubject[be32(uint32(id))] {
			if _, ok := want[k]; !ok {
				gone = append(gone, k)
			}
		}
	}
	var st Stats
	add := func(n int, err error) error { st.Written += n; return err }
	if err := add(w.cidrs.put(small.CIDRs)); err != nil {
		return st, err
	}
	if err := add(w.rules.put(want)); err != nil {
		return st, err
	}
	if err := add(w.iso.put(small.Isolation)); err != nil {
		return st, err
	}
	n, err := w.iso.del(small.Isolation)
	st.Deleted += n
	if err != nil {
		return st, err
	}
	for _, k := range gone {
		if err := w.rules.m.Delete(k); err != nil && !loader.IsNotExist(err) {
			return st, fmt.Errorf("delete %+v from map %s: %w", k, w.rules.m, err)
		}
		delete(w.rules.cur, k)
		w.unindex(k)
		st.Deleted++
	}
	n, err = w.cidrs.del(small.CIDRs)
	st.Deleted += n
	return st, err
}

func (w *Writer) unindex(k loader.PolicyKey) {
	if bs := w.bySubject[k.Subject]; bs != nil {
		delete(bs, k)
		if len(bs) == 0 {
			delete(w.bySubject, k.Subject)
		}
	}
}

func (w *Writer) index(k loader.PolicyKey) {
	bs := w.bySubject[k.Subject]
	if bs == nil {
		bs = map[loader.PolicyKey]struct{}{}
		w.bySubject[k.Subject] = bs
	}
	bs[k] = struct{}{}
}

// IPCache is the tern_ipcache entries of d's pod addresses (identity and IPC_F_POD). The
// agent's ipcache reconciler (package endpoint) owns that map; this is what it is fed.
func IPCache(d *policy.Desired) map[netip.Addr]loader.IPCacheValue {
	out := make(map[netip.Addr]loader.IPCacheValue, len(d.IPCache))
	for a, id := range d.IPCache {
		out[a] = loader.IPCacheValue{Identity: uint32(id), Flags: loader.IPCacheFlagPod}
	}
	return out
}
