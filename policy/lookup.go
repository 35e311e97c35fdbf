package policy

import "net/netip"

// Decide mirrors, over the compiled maps, what the datapath's policy stage decides for a
// new flow from src to dst on (proto, port): the egress verdict on the source's side and
// the ingress verdict on the destination's side. An address that is not a pod has no
// policy of its own (its verdict is true). It exists to test the compiler's output
// independently of the kernel and to explain verdicts in ternctl.
func (d *Desired) Decide(src, dst netip.Addr, proto uint8, port uint16) (egress, ingress bool) {
	egress = d.allowed(src, dst, Egress, proto, port)
	ingress = d.allowed(dst, src, Ingress, proto, port)
	return egress, ingress
}

func (d *Desired) allowed(self, peer netip.Addr, dir Direction, proto uint8, port uint16) bool {
	subject, ok := d.IPCache[self]
	if !ok {
		return true // not a pod: nothing of ours to enforce
	}
	iso := d.Isolation[subject]
	if dir == Ingress && iso&IsolatedIngress == 0 || dir == Egress && iso&IsolatedEgress == 0 {
		return true
	}
	if self == peer {
		return true // a pod cannot block access to itself
	}
	cidrID := d.LongestCIDR(peer)
	if cidrID == IdentityHost {
		return true
	}
	// The datapath's order: the peer pod's identity, the longest ipBlock prefix holding
	// the peer, then "any peer".
	if id := d.IPCache[peer]; id != IdentityAny && d.match(subject, id, dir, proto, port) {
		return true
	}
	if cidrID != IdentityAny && d.match(subject, cidrID, dir, proto, port) {
		return true
	}
	return d.match(subject, IdentityAny, dir, proto, port)
}

// LongestCIDR is the identity of the longest tern_policy_cidrs prefix holding a (0: none).
func (d *Desired) LongestCIDR(a netip.Addr) Identity {
	for bits := a.BitLen(); bits >= 0; bits-- {
		if id, ok := d.CIDRs[netip.PrefixFrom(a, bits).Masked()]; ok {
			return id
		}
	}
	return IdentityAny
}

// match tells whether some rule entry covers (subject, peer, dir, proto, port), as the LPM
// lookup in the datapath does.
func (d *Desired) match(subject, peer Identity, dir Direction, proto uint8, port uint16) bool {
	if _, ok := d.Rules[RuleKey{Subject: subject, Peer: peer, Dir: dir}]; ok {
		return true
	}
	for bits := 0; bits <= 16; bits++ {
		mask := uint16(0)
		if bits > 0 {
			mask = uint16(0xffff) << (16 - bits)
		}
		if _, ok := d.Rules[RuleKey{Subject: subject, Peer: peer, Dir: dir, Proto: proto, Port: port & mask, PortBits: uint8(bits)}]; ok {
			return true
		}
	}
	return false
}
