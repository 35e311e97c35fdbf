/* Packet parsing: Ethernet, IPv4 (with options), and the L4 ports of TCP, UDP and SCTP.
 * The result is a plain struct so later stages never touch raw offsets again. */
#pragma once

#include "common.h"

enum parse_result {
	PARSE_OK = 0,
	PARSE_NOT_IPV4 = 1,  /* ARP, IPv6, ...: not ours to touch */
	PARSE_TRUNCATED = 2,
	PARSE_BAD_IP = 3,
};

struct pkt {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;     /* 0 for ICMP and for non-first fragments until the frag stage fills it */
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;   /* the flags byte of the TCP header, 0 otherwise */
	__u8 is_frag;     /* part of a fragmented datagram */
	__u8 first_frag;  /* carries the L4 header */
	__u16 ip_id;
	__u16 l3_off;     /* always ETH_HLEN for now; kept explicit for offsets */
	__u16 l4_off;
	__u16 pad;
};

#define ETH_HLEN 14

/* Whether the packet holds n bytes from frame offset off by its IPv4 total length (ip: its
 * header, already checked against data_end). Bytes past the total length (Ethernet padding)
 * are no part of the packet: the stack trims them, so what lies there is never read as
 * headers. */
static __always_inline bool ip_holds(const struct iphdr *ip, __u32 off, __u32 n)
{
	return bpf_ntohs(ip->tot_len) >= off - ETH_HLEN + n;
}
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

static __always_inline int parse_packet(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return PARSE_NOT_IPV4; /* too short for Ethernet: leave it to the stack */
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return PARSE_NOT_IPV4;

	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return PARSE_TRUNCATED;
	if (ip->version != 4 || ip->ihl < 5)
		return PARSE_BAD_IP;

	__u32 ihl_len = ip->ihl * 4;
	if ((void *)ip + ihl_len > data_end)
		return PARSE_TRUNCATED;
	__u32 tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ihl_len)
		return PARSE_BAD_IP;
	/* A packet shorter than its header says is truncated: the stack would drop it in
	 * ip_rcv, but a translated one redirected to a backend's veth would skip that check
	 * here. skb->len, not data_end: a large packet has paged data beyond the linear part. */
	if (tot_len > skb->len - ETH_HLEN)
		return PARSE_TRUNCATED;

	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	p->ip_id = bpf_ntohs(ip->id);
	p->l3_off = ETH_HLEN;
	p->l4_off = ETH_HLEN + ihl_len;
	p->sport = 0;
	p->dport = 0;
	p->tcp_flags = 0;

	__u16 frag = bpf_ntohs(ip->frag_off);
	p->is_frag = (frag & (IP_MF | IP_OFFSET)) != 0;
	p->first_frag = (frag & IP_OFFSET) == 0;
	if (!p->first_frag)
		return PARSE_OK; /* no L4 header here; the frag stage supplies the ports */

	void *l4 = (void *)ip + ihl_len;
	switch (p->proto) {
	case IPPROTO_TCP: {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end || tot_len < ihl_len + sizeof(*tcp))
			return PARSE_TRUNCATED;
		if (tcp->doff < 5 || tot_len < ihl_len + tcp->doff * 4)
			return PARSE_BAD_IP;
		p->sport = tcp->source;
		p->dport = tcp->dest;
		p->tcp_flags = ((__u8 *)tcp)[13];
		break;
	}
	case IPPROTO_UDP:
	case IPPROTO_SCTP: {
		/* UDP and SCTP both start with source and destination port. */
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > data_end || tot_len < ihl_len + sizeof(*udp))
			return PARSE_TRUNCATED;
		p->sport = udp->source;
		p->dport = udp->dest;
		break;
	}
	default:
		break;
	}
	return PARSE_OK;
}
