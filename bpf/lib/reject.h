/* Answers for a Service with no ready endpoints, as kube-proxy's REJECT does: a TCP RST or
 * an ICMP port-unreachable from the VIP, built in place of the client's packet and sent
 * straight back out of the interface it came in on. Silence would make clients wait for
 * their connect timeout. */
#pragma once

#include "common.h"
#include "parse.h"
#include "nat.h"

struct pseudo_tcp {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len;
	struct tcphdr tcp;
};

struct icmp_reply {
	struct iphdr ip;
	struct icmphdr icmp;
	struct iphdr inner_ip;
	__u8 inner_l4[8];
};

static __always_inline void reply_ip(struct iphdr *ip, const struct pkt *p, __u8 proto, __u16 len)
{
	__builtin_memset(ip, 0, sizeof(*ip));
	ip->version = 4;
	ip->ihl = 5;
	ip->tot_len = bpf_htons(len);
	ip->frag_off = bpf_htons(0x4000); /* DF */
	ip->ttl = 64;
	ip->protocol = proto;
	ip->saddr = p->daddr; /* from the VIP */
	ip->daddr = p->saddr;
	ip->check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));
}

static __always_inline int swap_eth(struct __sk_buff *skb)
{
	struct ethhdr eth;
	__u8 tmp[ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return -1;
	__builtin_memcpy(tmp, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, tmp, ETH_ALEN);
	return bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0);
}

/* Returns the tc verdict; *ok tells the caller whether a reply went out. */
static __always_inline int reject_tcp(struct __sk_buff *skb, const struct pkt *p, bool *ok)
{
	struct iphdr ip;
	struct pseudo_tcp ph;
	struct tcphdr *th = &ph.tcp;

	*ok = false;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) ||
	    bpf_skb_load_bytes(skb, p->l4_off, th, sizeof(*th)))
		return TC_ACT_SHOT;
	if (th->rst) {
		*ok = true; /* never answer a RST */
		return TC_ACT_SHOT;
	}

	__u32 payload = bpf_ntohs(ip.tot_len) - ip.ihl * 4 - th->doff * 4;
	__u32 in_seq = bpf_ntohl(th->seq);
	__be32 in_ack = th->ack_seq;
	bool had_ack = th->ack;

	__u32 seg_len = payload + th->syn + th->fin;
	__builtin_memset(th, 0, sizeof(*th));
	th->source = p->dport;
	th->dest = p->sport;
	th->doff = 5;
	th->rst = 1;
	if (had_ack) {
		th->seq = in_ack;
	} else {
		th->ack = 1;
		th->ack_seq = bpf_htonl(in_seq + seg_len);
	}
	ph.saddr = p->daddr;
	ph.daddr = p->saddr;
	ph.zero = 0;
	ph.proto = IPPROTO_TCP;
	ph.len = bpf_htons(sizeof(struct tcphdr));
	th->check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0));

	struct iphdr rip;
	reply_ip(&rip, p, IPPROTO_TCP, sizeof(struct iphdr) + sizeof(struct tcphdr));

	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(rip) + sizeof(*th), 0) ||
	    swap_eth(skb) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &rip, sizeof(rip), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(rip), th, sizeof(*th), 0))
		return TC_ACT_SHOT;
	*ok = true;
	return bpf_redirect(skb->ifindex, 0);
}

static __always_inline int reject_icmp(struct __sk_buff *skb, const struct pkt *p, bool *ok)
{
	struct icmp_reply r;

	*ok = false;
	/* The quoted header must be the client's own; a header with options would not fit the
	 * fixed reply, and such packets are rare enough to drop with a reason. */
	if (p->l4_off != ETH_HLEN + sizeof(struct iphdr))
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &r.inner_ip, sizeof(r.inner_ip)) ||
	    bpf_skb_load_bytes(skb, p->l4_off, r.inner_l4, sizeof(r.inner_l4)))
		return TC_ACT_SHOT;

	__builtin_memset(&r.icmp, 0, sizeof(r.icmp));
	r.icmp.type = ICMP_DEST_UNREACH;
	r.icmp.code = ICMP_PORT_UNREACH;
	r.icmp.checksum = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&r.icmp,
						  sizeof(r) - sizeof(r.ip), 0));
	reply_ip(&r.ip, p, IPPROTO_ICMP, sizeof(r));

	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(r), 0) ||
	    swap_eth(skb) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0))
		return TC_ACT_SHOT;
	*ok = true;
	return bpf_redirect(skb->ifindex, 0);
}
