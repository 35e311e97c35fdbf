package service

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"slices"
)

// MaglevPrimes are the Maglev table sizes tern uses (as Cilium's list: a prime just below
// each power of two from 2^8 to 2^17). A prime size makes every backend's permutation visit
// every entry.
var MaglevPrimes = []uint32{251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071}

// MaglevSize is the table size for n backends: fixed when the node sets one (it must be one
// of MaglevPrimes), else the smallest listed prime of at least 100 n, where every
// backend's share is within about 1% of the others' (the Maglev paper's bound); past 1,310
// backends the largest prime.
func MaglevSize(n int, fixed uint32) uint32 {
	if fixed != 0 {
		return fixed
	}
	for _, p := range MaglevPrimes {
		if uint64(p) >= 100*uint64(n) {
			return p
		}
	}
	return MaglevPrimes[len(MaglevPrimes)-1]
}

// ValidMaglevSize checks a configured table size.
func ValidMaglevSize(m uint32) error {
	for _, p := range MaglevPrimes {
		if p == m {
			return nil
		}
	}
	return fmt.Errorf("maglev table size %d is not one of %v (pick one at least 100 times the backends of the largest Maglev Service, or 0 for a per-Service size)", m, MaglevPrimes)
}

// Maglev builds a Maglev lookup table (Eisenbud et al., NSDI 2016, section 3.4) of m
// entries over backends: entry i names the index in backends of the backend a flow whose
// hash is i mod m goes to. Each backend's preference list is a permutation of the entries
// derived from its address and port alone (not from its position), and the backends take
// turns claiming their next preferred free entry; so every backend holds m/n entries give
// or take one, and when a backend comes or goes only about 1/n of the entries change
// owner. m must be a prime larger than len(backends); nil when there are no backends.
func Maglev(backends []Backend, m uint32) []uint32 {
	n := len(backends)
	if n == 0 || m == 0 {
		return nil
	}
	// Turns are taken in the backends' sorted order, so the table does not depend on the
	// order the caller lists them in.
	order := make([]int, n)
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int { return compareBackends(backends[a], backends[b]) })
	offset := make([]uint64, n)
	skip := make([]uint64, n)
	for i, bi := range order {
		h1, h2 := maglevHashes(backends[bi])
		offset[i] = h1 % uint64(m)
		skip[i] = h2%uint64(m-1) + 1
	}
	const free = ^uint32(0)
	table := make([]uint32, m)
	for i := range table {
		table[i] = free
	}
	next := make([]uint64, n)
	filled := uint32(0)
	for {
		for i := range n {
			c := (offset[i] + next[i]*skip[i]) % uint64(m)
			for table[c] != free {
				next[i]++
				c = (offset[i] + next[i]*skip[i]) % uint64(m)
			}
			table[c] = uint32(order[i])
			next[i]++
			filled++
			if filled == m {
				return table
			}
		}
	}
}

// maglevHashes are the two independent hashes of a backend's identity that place its
// permutation. FNV-1a is stable across agent restarts and builds, so a restarted agent
// builds the same table and moves no flow.
func maglevHashes(b Backend) (uint64, uint64) {
	var buf [7]byte
	a := b.Addr.As4()
	copy(buf[:4], a[:])
	binary.BigEndian.PutUint16(buf[4:6], b.Port)
	h := fnv.New64a()
	buf[6] = 'o'
	h.Write(buf[:])
	h1 := h.Sum64()
	h.Reset()
	buf[6] = 's'
	h.Write(buf[:])
	return h1, h.Sum64()
}
