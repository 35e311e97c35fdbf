package loader

import (
	"encoding/binary"
	"net/netip"
)

// BPF structs hold addresses and ports in network byte order. bpf2go maps __be32 and __be16
// to plain uint32 and uint16 that are stored little-endian on this architecture, so the
// conversions below go through the byte order of memory, not of numbers.

// AddrToBE returns the uint32 whose in-memory bytes are the IPv4 address a.
func AddrToBE(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

// BEToAddr is the inverse of AddrToBE.
func BEToAddr(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// PortToBE returns the uint16 whose in-memory bytes are port in network order.
func PortToBE(port uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], port)
	return binary.NativeEndian.Uint16(b[:])
}

// BEToPort is the inverse of PortToBE.
func BEToPort(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}
