// Package packet builds and parses Ethernet/IPv4/TCP/UDP/ICMP frames for datapath tests and
// benchmarks, and checks their checksums independently of the kernel.
package packet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

const (
	ProtoICMP = 1
	ProtoTCP  = 6
	ProtoUDP  = 17
	ProtoSCTP = 132

	EthLen = 14
)

// TCP flag bits.
const (
	FIN = 0x01
	SYN = 0x02
	RST = 0x04
	PSH = 0x08
	ACK = 0x10
)

// Frame describes an IPv4 frame. Build fills in lengths and checksums.
type Frame struct {
	SrcMAC, DstMAC [6]byte
	Src, Dst       netip.Addr
	Proto          uint8
	TTL            uint8
	ID             uint16
	FragOffset     uint16 // in 8-byte units
	MoreFragments  bool
	Options        []byte // IPv4 options, padded by the caller to a multiple of 4
	SrcPort        uint16
	DstPort        uint16
	Seq, Ack       uint32
	TCPFlags       uint8
	ICMPType       uint8
	ICMPCode       uint8
	Payload        []byte
	// NoUDPChecksum leaves the UDP checksum 0 ("none").
	NoUDPChecksum bool
	// L4Raw replaces the L4 header and payload (for fragments and garbage).
	L4Raw []byte
}

// Build serialises f with correct lengths and checksums.
func (f Frame) Build() []byte {
	var l4 []byte
	switch {
	case f.L4Raw != nil:
		l4 = append([]byte(nil), f.L4Raw...)
	case f.Proto == ProtoTCP:
		l4 = make([]byte, 20+len(f.Payload))
		binary.BigEndian.PutUint16(l4[0:], f.SrcPort)
		binary.BigEndian.PutUint16(l4[2:], f.DstPort)
		binary.BigEndian.PutUint32(l4[4:], f.Seq)
		binary.BigEndian.PutUint32(l4[8:], f.Ack)
		l4[12] = 5 << 4
		l4[13] = f.TCPFlags
		binary.BigEndian.PutUint16(l4[14:], 65535)
		copy(l4[20:], f.Payload)
		binary.BigEndian.PutUint16(l4[16:], l4Checksum(f.Src, f.Dst, ProtoTCP, l4))
	case f.Proto == ProtoUDP:
		l4 = make([]byte, 8+len(f.Payload))
		binary.BigEndian.PutUint16(l4[0:], f.SrcPort)
		binary.BigEndian.PutUint16(l4[2:], f.DstPort)
		binary.BigEndian.PutUint16(l4[4:], uint16(len(l4)))
		copy(l4[8:], f.Payload)
		if !f.NoUDPChecksum {
			c := l4Checksum(f.Src, f.Dst, ProtoUDP, l4)
			if c == 0 {
				c = 0xffff
			}
			binary.BigEndian.PutUint16(l4[6:], c)
		}
	case f.Proto == ProtoSCTP:
		l4 = make([]byte, 12+len(f.Payload))
		binary.BigEndian.PutUint16(l4[0:], f.SrcPort)
		binary.BigEndian.PutUint16(l4[2:], f.DstPort)
		copy(l4[12:], f.Payload)
	case f.Proto == ProtoICMP:
		l4 = make([]byte, 8+len(f.Payload))
		l4[0], l4[1] = f.ICMPType, f.ICMPCode
		copy(l4[8:], f.Payload)
		binary.BigEndian.PutUint16(l4[2:], Checksum(l4))
	default:
		l4 = append([]byte(nil), f.Payload...)
	}

	ihl := 20 + len(f.Options)
	out := make([]byte, EthLen+ihl+len(l4))
	copy(out[0:6], f.DstMAC[:])
	copy(out[6:12], f.SrcMAC[:])
	binary.BigEndian.PutUint16(out[12:], 0x0800)
	ip := out[EthLen:]
	ip[0] = 0x40 | byte(ihl/4)
	binary.BigEndian.PutUint16(ip[2:], uint16(ihl+len(l4)))
	binary.BigEndian.PutUint16(ip[4:], f.ID)
	frag := f.FragOffset & 0x1fff
	if f.MoreFragments {
		frag |= 0x2000
	}
	binary.BigEndian.PutUint16(ip[6:], frag)
	ttl := f.TTL
	if ttl == 0 {
		ttl = 64
	}
	ip[8] = ttl
	ip[9] = f.Proto
	s, d := f.Src.As4(), f.Dst.As4()
	copy(ip[12:16], s[:])
	copy(ip[16:20], d[:])
	copy(ip[20:ihl], f.Options)
	binary.BigEndian.PutUint16(ip[10:], Checksum(ip[:ihl]))
	copy(ip[ihl:], l4)
	return out
}

// Checksum is the Internet checksum (RFC 1071) of b.
func Checksum(b []byte) uint16 { return ^fold(sum(b, 0)) }

func sum(b []byte, acc uint32) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		acc += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		acc += uint32(b[len(b)-1]) << 8
	}
	return acc
}

func fold(acc uint32) uint16 {
	for acc > 0xffff {
		acc = (acc & 0xffff) + (acc >> 16)
	}
	return uint16(acc)
}

func l4Checksum(src, dst netip.Addr, proto uint8, l4 []byte) uint16 {
	s, d := src.As4(), dst.As4()
	var ph [12]byte
	copy(ph[0:4], s[:])
	copy(ph[4:8], d[:])
	ph[9] = proto
	binary.BigEndian.PutUint16(ph[10:], uint16(len(l4)))
	return ^fold(sum(l4, sum(ph[:], 0)))
}

// Parsed is a decoded frame.
type Parsed struct {
	SrcMAC, DstMAC   [6]byte
	Src, Dst         netip.Addr
	Proto            uint8
	IHL              int
	TotalLen         int
	ID               uint16
	Frag             uint16
	SrcPort, DstPort uint16
	Seq, Ack         uint32
	TCPFlags         uint8
	ICMPType         uint8
	ICMPCode         uint8
	L4               []byte // L4 header and payload
	IPChecksumOK     bool
	L4ChecksumOK     bool // for fragments and protocols without a checksum: true
	UDPChecksumZero  bool
}

// Parse decodes an Ethernet/IPv4 frame and verifies its checksums.
func Parse(b []byte) (Parsed, error) {
	var p Parsed
	if len(b) < EthLen+20 {
		return p, fmt.Errorf("frame of %d bytes is too short for Ethernet+IPv4", len(b))
	}
	copy(p.DstMAC[:], b[0:6])
	copy(p.SrcMAC[:], b[6:12])
	if binary.BigEndian.Uint16(b[12:]) != 0x0800 {
		return p, errors.New("not IPv4")
	}
	ip := b[EthLen:]
	p.IHL = int(ip[0]&0x0f) * 4
	p.TotalLen = int(binary.BigEndian.Uint16(ip[2:]))
	if p.IHL < 20 || len(ip) < p.TotalLen || p.TotalLen < p.IHL {
		return p, fmt.Errorf("bad IPv4 lengths: ihl %d total %d frame %d", p.IHL, p.TotalLen, len(ip))
	}
	p.ID = binary.BigEndian.Uint16(ip[4:])
	p.Frag = binary.BigEndian.Uint16(ip[6:])
	p.Proto = ip[9]
	p.Src = netip.AddrFrom4([4]byte(ip[12:16]))
	p.Dst = netip.AddrFrom4([4]byte(ip[16:20]))
	p.IPChecksumOK = Checksum(ip[:p.IHL]) == 0
	p.L4 = ip[p.IHL:p.TotalLen]
	p.L4ChecksumOK = true
	if p.Frag&0x1fff != 0 || p.Frag&0x2000 != 0 {
		// Checksum spans fragments; only the first has ports.
		if p.Frag&0x1fff != 0 {
			return p, nil
		}
	}
	whole := p.Frag&0x3fff == 0
	l4 := p.L4
	switch p.Proto {
	case ProtoTCP:
		if len(l4) < 20 {
			return p, errors.New("truncated TCP header")
		}
		p.SrcPort, p.DstPort = binary.BigEndian.Uint16(l4), binary.BigEndian.Uint16(l4[2:])
		p.Seq, p.Ack = binary.BigEndian.Uint32(l4[4:]), binary.BigEndian.Uint32(l4[8:])
		p.TCPFlags = l4[13]
		if whole {
			p.L4ChecksumOK = l4Checksum(p.Src, p.Dst, ProtoTCP, l4) == 0
		}
	case ProtoUDP:
		if len(l4) < 8 {
			return p, errors.New("truncated UDP header")
		}
		p.SrcPort, p.DstPort = binary.BigEndian.Uint16(l4), binary.BigEndian.Uint16(l4[2:])
		p.UDPChecksumZero = binary.BigEndian.Uint16(l4[6:]) == 0
		if whole && !p.UDPChecksumZero {
			p.L4ChecksumOK = l4Checksum(p.Src, p.Dst, ProtoUDP, l4) == 0
		}
	case ProtoSCTP:
		if len(l4) < 12 {
			return p, errors.New("truncated SCTP header")
		}
		p.SrcPort, p.DstPort = binary.BigEndian.Uint16(l4), binary.BigEndian.Uint16(l4[2:])
	case ProtoICMP:
		if len(l4) < 8 {
			return p, errors.New("truncated ICMP header")
		}
		p.ICMPType, p.ICMPCode = l4[0], l4[1]
		if whole {
			p.L4ChecksumOK = Checksum(l4) == 0
		}
	}
	return p, nil
}

// ChecksumsOK reports both checksums.
func (p Parsed) ChecksumsOK() bool { return p.IPChecksumOK && p.L4ChecksumOK }
