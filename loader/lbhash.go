package loader

import (
	"encoding/binary"
	"net/netip"
)

// LBTupleHash is lb_tuple_hash (bpf/lib/lb.h) in Go: the hash a Maglev frontend selects a
// new flow's table entry by (entry = hash % table size), from the flow's 5-tuple as the
// client sent it. The tc path and the socket hooks compute it in C; this mirror lets a test
// or a tool say which backend a tuple gets from a table read back from the kernel.
func LBTupleHash(src, dst netip.Addr, sport, dport uint16, proto uint8) uint32 {
	mix := func(h uint32) uint32 { // murmur3's finaliser
		h ^= h >> 16
		h *= 0x85ebca6b
		h ^= h >> 13
		h *= 0xc2b2ae35
		h ^= h >> 16
		return h
	}
	// The C code mixes the addresses and ports as they sit in memory (network order) read
	// as host-order integers.
	be32 := func(a netip.Addr) uint32 { b := a.As4(); return binary.LittleEndian.Uint32(b[:]) }
	be16 := func(p uint16) uint32 { return uint32(p>>8 | p<<8&0xff00) }
	h := mix(be32(src) ^ 0x9e3779b9)
	h = mix(h ^ be32(dst))
	h = mix(h ^ (be16(sport)<<16 | be16(dport)))
	return mix(h ^ uint32(proto))
}
