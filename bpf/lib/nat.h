/* Address and port rewrites with incremental checksum updates. The L4 checksum covers a
 * pseudo header holding both addresses, so an address change updates IPv4 and L4 sums;
 * BPF_F_PSEUDO_HDR keeps CHECKSUM_PARTIAL packets (veth offload) correct. SCTP's CRC32c
 * has no pseudo header and cannot be patched incrementally: an SCTP port change is refused
 * by the caller. Non-first fragments carry no L4 header, so only L3 is rewritten. */
#pragma once

#include "common.h"
#include "parse.h"

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SADDR_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))

static __always_inline int l4_csum_off(const struct pkt *p, __u64 *flags)
{
	switch (p->proto) {
	case IPPROTO_TCP:
		*flags = 0;
		return p->l4_off + offsetof(struct tcphdr, check);
	case IPPROTO_UDP:
		/* A zero UDP checksum means "none"; keep it that way. */
		*flags = BPF_F_MARK_MANGLED_0;
		return p->l4_off + offsetof(struct udphdr, check);
	default:
		return -1;
	}
}

/* Rewrite the destination (dst=true) or source address and port. Returns 0 or a negative
 * helper error. */
static __always_inline int nat_rewrite(struct __sk_buff *skb, const struct pkt *p, bool dst,
				       __be32 new_addr, __be16 new_port)
{
	__be32 old_addr = dst ? p->daddr : p->saddr;
	__be16 old_port = dst ? p->dport : p->sport;
	bool l4 = p->first_frag && (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP ||
				    p->proto == IPPROTO_SCTP);
	__u64 csum_flags = 0;
	int csum_off = l4_csum_off(p, &csum_flags);
	int ret;

	if (old_addr != new_addr) {
		if (l4 && csum_off >= 0) {
			ret = bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
						  BPF_F_PSEUDO_HDR | csum_flags | sizeof(new_addr));
			if (ret)
				return ret;
		}
		ret = bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr));
		if (ret)
			return ret;
		ret = bpf_skb_store_bytes(skb, dst ? IP_DADDR_OFF : IP_SADDR_OFF, &new_addr,
					  sizeof(new_addr), 0);
		if (ret)
			return ret;
	}
	if (l4 && old_port != new_port) {
		if (csum_off >= 0) {
			ret = bpf_l4_csum_replace(skb, csum_off, old_port, new_port,
						  csum_flags | sizeof(new_port));
			if (ret)
				return ret;
		}
		/* Source port is the first 16 bits of TCP, UDP and SCTP headers; dest the next. */
		ret = bpf_skb_store_bytes(skb, p->l4_off + (dst ? 2 : 0), &new_port,
					  sizeof(new_port), 0);
		if (ret)
			return ret;
	}
	return 0;
}

static __always_inline __u16 csum_fold(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}
