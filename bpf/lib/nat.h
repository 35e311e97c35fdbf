/* Address and port rewrites with incremental checksum updates. The L4 checksum covers a
 * pseudo header holding both addresses, so an address change updates IPv4 and L4 sums;
 * BPF_F_PSEUDO_HDR keeps CHECKSUM_PARTIAL packets (veth offload) correct. SCTP's CRC32c
 * has no pseudo header and cannot be patched incrementally: an SCTP port change is refused
 * by the caller. Non-first fragments carry no L4 header, so only L3 is rewritten. */
#pragma once

#include "common.h"
#include "parse.h"


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

/* RFC 1624: update a 16-bit one's complement checksum for a 32-bit field change. Works on
 * raw network-order words: the sum does not care about byte order as long as it is
 * consistent. */
static __always_inline __u16 csum_replace4(__u16 check, __be32 from, __be32 to)
{
	__u32 s = (__u16)~check;

	s += (__u16)~(from & 0xffff) + (__u16)~(from >> 16) + (to & 0xffff) + (to >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Rewrite the destination (dst=true) or source address and port. Returns 0 or a negative
 * error. Fields are written with direct packet access and the IPv4 header checksum is
 * patched by hand (it is never offloaded); the L4 checksum goes through the helper,
 * which knows whether the packet is CHECKSUM_PARTIAL. Direct writes come first because a
 * helper that may move packet data invalidates packet pointers. */
static __always_inline int nat_rewrite(struct __sk_buff *skb, const struct pkt *p, bool dst,
				       __be32 new_addr, __be16 new_port)
{
	__be32 old_addr = dst ? p->daddr : p->saddr;
	__be16 old_port = dst ? p->dport : p->sport;
	bool l4 = p->first_frag && (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP ||
				    p->proto == IPPROTO_SCTP);
	bool addr_changes = old_addr != new_addr;
	bool port_changes = l4 && old_port != new_port;
	__u64 csum_flags = 0;
	int csum_off = l4_csum_off(p, &csum_flags);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	__u32 l4_off = p->l4_off & 0x7f; /* at most ETH_HLEN + 60: bounds for the verifier */
	__be16 *ports = data + l4_off;

	if ((void *)(ip + 1) > data_end)
		return -1;
	if (addr_changes) {
		ip->check = csum_replace4(ip->check, old_addr, new_addr);
		if (dst)
			ip->daddr = new_addr;
		else
			ip->saddr = new_addr;
	}
	if (port_changes) {
		if ((void *)(ports + 2) > data_end)
			return -1;
		ports[dst ? 1 : 0] = new_port;
	}
	if (csum_off < 0 || !l4)
		return 0;
	if (addr_changes &&
	    bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
				BPF_F_PSEUDO_HDR | csum_flags | sizeof(new_addr)))
		return -1;
	if (port_changes &&
	    bpf_l4_csum_replace(skb, csum_off, old_port, new_port, csum_flags | sizeof(new_port)))
		return -1;
	return 0;
}

static __always_inline __u16 csum_fold(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}
