package loader

import (
	"net/netip"
)

// External frontends (bpf/lib/nodeport.h, bpf/lib/lb.h): the loadBalancerSourceRanges the
// service reconciler writes, and the NodePort SNAT flows the datapath keeps.

// SrcRangeKeyOf is the tern_lb_src_ranges key allowing prefix at the frontend with id.
func SrcRangeKeyOf(id uint32, p netip.Prefix) SrcRangeKey {
	p = p.Masked()
	return SrcRangeKey{Prefixlen: 32 + uint32(p.Bits()), SvcId: id, Addr: AddrToBE(p.Addr())}
}

// Prefix is the client CIDR a tern_lb_src_ranges key allows.
func (k SrcRangeKey) Prefix() netip.Prefix {
	return netip.PrefixFrom(BEToAddr(k.Addr), int(k.Prefixlen)-32)
}

// DumpSrcRanges reads every allowed (frontend id, client CIDR).
func (m *Maps) DumpSrcRanges() (map[SrcRangeKey]uint8, error) {
	return dump[SrcRangeKey, uint8](m.SrcRanges)
}

func (m *Maps) PutSrcRange(k SrcRangeKey) error    { return m.SrcRanges.Put(k, uint8(1)) }
func (m *Maps) DeleteSrcRange(k SrcRangeKey) error { return m.SrcRanges.Delete(k) }

// DumpNodePortSNAT reads every external client's flow to a remote backend: translated wire
// tuple -> client and frontend.
func (m *Maps) DumpNodePortSNAT() (map[CTKey]NodePortRev, error) {
	return dump[CTKey, NodePortRev](m.NodePortSNAT)
}
