package policy

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
)

// cidrIndex is the ipBlock prefixes sorted by address, then length, so the prefixes inside
// a block are one contiguous run found by binary search. Resolving an ipBlock peer used to
// test every prefix of the cluster against the block: with 17,000 prefixes, one per peer,
// that is 17,000² tests, and a compile took over 90 s on a loaded node (docs/reliability.md).
// With the index a peer costs log(n) plus the prefixes that start inside it.
type cidrIndex struct {
	entries []cidrEntry
	// scanned counts the entries visited by inside (the work a compile does; tests bound it).
	scanned int
}

type cidrEntry struct {
	p  netip.Prefix
	id Identity
}

// newCIDRIndex indexes the prefix identities of cidrs, leaving out the node's own
// addresses (IdentityHost): an ipBlock never selects them as a peer.
func newCIDRIndex(cidrs map[netip.Prefix]Identity) *cidrIndex {
	x := &cidrIndex{entries: make([]cidrEntry, 0, len(cidrs))}
	for p, id := range cidrs {
		if id != IdentityHost {
			x.entries = append(x.entries, cidrEntry{p, id})
		}
	}
	slices.SortFunc(x.entries, func(a, b cidrEntry) int {
		if c := a.p.Addr().Compare(b.p.Addr()); c != 0 {
			return c
		}
		return cmp.Compare(a.p.Bits(), b.p.Bits())
	})
	return x
}

// inside calls fn with the identity of every indexed prefix that lies inside block and
// inside none of excepts (all masked). A prefix inside block starts at an address inside
// it, so only that run of the sorted entries is visited.
func (x *cidrIndex) inside(block netip.Prefix, excepts []netip.Prefix, fn func(Identity)) {
	ex := newExceptSet(excepts)
	start := block.Addr()
	i, _ := slices.BinarySearchFunc(x.entries, start, func(e cidrEntry, a netip.Addr) int { return e.p.Addr().Compare(a) })
	for ; i < len(x.entries) && block.Contains(x.entries[i].p.Addr()); i++ {
		x.scanned++
		e := x.entries[i]
		if e.p.Bits() < block.Bits() || ex.covers(e.p) {
			continue
		}
		fn(e.id)
	}
}

// exceptSet answers "does some except contain this prefix" in at most 33 map lookups
// however many excepts a block has (a block with thousands of excepts is legal).
type exceptSet struct {
	set     map[netip.Prefix]bool
	minBits int
}

func newExceptSet(excepts []netip.Prefix) exceptSet {
	s := exceptSet{minBits: 33}
	if len(excepts) == 0 {
		return s
	}
	s.set = make(map[netip.Prefix]bool, len(excepts))
	for _, x := range excepts {
		s.set[x] = true
		s.minBits = min(s.minBits, x.Bits())
	}
	return s
}

func (s exceptSet) covers(p netip.Prefix) bool {
	for b := s.minBits; b <= p.Bits(); b++ {
		if s.set[netip.PrefixFrom(p.Addr(), b).Masked()] {
			return true
		}
	}
	return false
}

// ErrTooManyCIDRs is the class of CIDROverflowError (errors.Is).
var ErrTooManyCIDRs = errors.New("more ipBlock prefixes than the policy CIDR map holds")

// CIDROverflowError says the policies name more ipBlock prefixes (cidr and except, plus the
// node's own addresses) than tern_policy_cidrs holds. Compiler.Desired reports it before
// compiling any rule: nothing it could compile would fit, and compiling 17,000 prefixes only
// to have the kernel refuse them delayed the report by minutes.
type CIDROverflowError struct {
	Prefixes, Capacity int
}

func (e *CIDROverflowError) Error() string {
	return fmt.Sprintf("the networkpolicies name %d ipBlock prefixes (cidr and except, with the node's addresses) but tern_policy_cidrs holds %d: "+
		"merge ipBlocks into fewer, wider prefixes or raise the agent's maxPolicyCIDRs; the previous rules stay enforced",
		e.Prefixes, e.Capacity)
}

func (e *CIDROverflowError) Is(target error) bool { return target == ErrTooManyCIDRs }
