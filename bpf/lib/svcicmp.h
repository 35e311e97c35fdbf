/* ICMP errors about a service flow, turned back to what the client sent.
 *
 * A client's packet to a frontend leaves translated (client -> backend, or for an external
 * client's flow to a remote backend node -> backend). An error about it (a backend's UDP
 * port unreachable, a router's fragmentation needed or TTL exceeded) quotes that translated
 * header, which the client's socket never sent: it is connected to the frontend, so the
 * kernel finds no socket for the quote and drops the error. A UDP client then waits for an
 * answer instead of getting ECONNREFUSED, and a TCP flow through a link with a smaller MTU
 * never learns the path MTU. kube-proxy's conntrack turns such errors back (RELATED
 * packets); so does this file: the quote becomes the client's own packet (the frontend's
 * address and port, the client's own address and port), and the outer source becomes the
 * frontend, as netfilter's reply translation of a DNAT flow does (the client cannot tell who
 * sent the error, as with kube-proxy).
 *
 *   svc_icmp_error  an error on its way to the client (tern_to_pod for a pod's flows,
 *                   tern_to_netdev for an external client's flow to a local backend): the
 *                   flow is the quote's REVNAT entry (conntrack.h), in its opening direction
 *   np_icmp_error   an error arriving from the VPC about an external client's flow that was
 *                   source-translated to the node (nodeport.h): the quote's tern_nodeport_snat
 *                   entry names the client and the frontend; the outer destination becomes
 *                   the client
 *
 * The quoted L4 checksum is left as it was: an error quotes 8 bytes of a TCP header (no
 * checksum) and no receiver checks a quoted UDP checksum; the quoted IPv4 header's checksum
 * and the ICMP checksum are kept right. Hairpin flows (the client is its own backend, source
 * masqueraded), quotes with IP options, quotes of later fragments and quotes that run past the
 * packet's IPv4 total length are left alone. */
#pragma once

#include "common.h"
#include "conntrack.h"
#include "nat.h"
#include "parse.h"

#define ICMP_NOT_MINE (-1)

/* The quoted packet of an ICMP error: its tuple as it was sent. */
struct icmp_quote {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
};

static __always_inline bool icmp_is_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

/* p: ICMP, a first fragment or a whole packet. Reads an error's quote of a TCP, UDP or
 * SCTP packet (an IPv4 header without options and the ports after it) into q; false for
 * anything else. The quote is pulled into the linear area, writable. */
static __always_inline bool icmp_quote_read(struct __sk_buff *skb, const struct pkt *p, struct icmp_quote *q)
{
	if (!p->first_frag || p->proto != IPPROTO_ICMP)
		return false;
	__u32 off = p->l4_off & 0x7f;
	__u8 type;

	/* The type first, so that echo traffic is not pulled into the linear area. */
	if (bpf_skb_load_bytes(skb, off, &type, 1) || !icmp_is_error(type))
		return false;
	/* ICMP header (8) + quoted IPv4 header without options (20) + quoted ports (4). */
	if (bpf_skb_pull_data(skb, off + 8 + 20 + 4))
		return false;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	struct iphdr *in = data + off + 8;
	__be16 *ports = (__be16 *)(in + 1);

	if ((void *)(ip + 1) > data_end || (void *)(ports + 2) > data_end)
		return false;
	if (!ip_holds(ip, off, 8 + 20 + 4))
		return false;
	if (in->ihl != 5 || (in->frag_off & bpf_htons(0x1fff)))
		return false;
	q->proto = in->protocol;
	if (q->proto != IPPROTO_TCP && q->proto != IPPROTO_UDP && q->proto != IPPROTO_SCTP)
		return false;
	q->saddr = in->saddr;
	q->daddr = in->daddr;
	q->sport = ports[0];
	q->dport = ports[1];
	return true;
}

/* Rewrite the quote read by icmp_quote_read to to's addresses and ports, and the outer
 * header's source to outer_src and destination to outer_dst. 0, or a drop reason. */
static __always_inline int icmp_quote_rewrite(struct __sk_buff *skb, const struct pkt *p,
					      const struct icmp_quote *to, __be32 outer_src,
					      __be32 outer_dst)
{
	__u32 off = p->l4_off & 0x7f;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 *icmp = data + off;
	struct iphdr *in = data + off + 8;
	__be32 *ports = (__be32 *)(in + 1);

	if ((void *)(ports + 1) > data_end)
		return REASON_DROP_NAT_FAILED;
	__be32 new_ports;
	((__be16 *)&new_ports)[0] = to->sport;
	((__be16 *)&new_ports)[1] = to->dport;
	__be16 old_in_check = in->check;
	__be16 new_in_check = csum_replace4(old_in_check, in->saddr, to->saddr);
	new_in_check = csum_replace4(new_in_check, in->daddr, to->daddr);
	__be16 *icmp_check = (__be16 *)(icmp + 2);
	__u16 check = *icmp_check;

	/* The ICMP checksum covers the quote: every changed word moves it. */
	check = csum_replace4(check, in->saddr, to->saddr);
	check = csum_replace4(check, in->daddr, to->daddr);
	check = csum_replace4(check, old_in_check, new_in_check);
	check = csum_replace4(check, *ports, new_ports);
	in->saddr = to->saddr;
	in->daddr = to->daddr;
	in->check = new_in_check;
	*ports = new_ports;
	*icmp_check = check;
	/* The outer header (ICMP has no pseudo header; only the IPv4 sum moves). */
	if (nat_rewrite(skb, p, false, outer_src, 0) || nat_rewrite(skb, p, true, outer_dst, 0))
		return REASON_DROP_NAT_FAILED;
	return 0;
}

/* An error on its way to the client of a service flow: 0 when it was turned back, a drop
 * reason when the rewrite failed, ICMP_NOT_MINE otherwise (the caller goes on as before). */
static __always_inline int svc_icmp_error(struct __sk_buff *skb, const struct pkt *p, __u64 now)
{
	struct icmp_quote q;

	/* The quote is the client's own packet: its source is where the error goes. */
	if (!icmp_quote_read(skb, p, &q) || q.saddr != p->daddr)
		return ICMP_NOT_MINE;
	struct ct_key k;
	bool from_a;
	ct_flow_key(&k, q.saddr, q.sport, q.daddr, q.dport, q.proto, &from_a);
	struct ct_value *ct = ct_lookup(&k, now);
	if (!ct || (ct->flags & (CT_F_REVNAT | CT_F_HAIRPIN)) != CT_F_REVNAT || ct_is_reply(ct, from_a))
		return ICMP_NOT_MINE;
	struct icmp_quote to = {
		.saddr = q.saddr, .sport = ct->nat_sport, .daddr = ct->nat_addr, .dport = ct->nat_port,
	};
	return icmp_quote_rewrite(skb, p, &to, ct->nat_addr, p->daddr);
}
