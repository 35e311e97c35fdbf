/* ICMP errors about a service flow, on their way into the client pod.
 *
 * A client's packet to a frontend leaves translated (client -> backend). An error about it
 * (a backend's UDP port unreachable, a router's fragmentation needed or TTL exceeded)
 * quotes that translated header, which the client's socket never sent: it is connected to
 * the frontend, so the kernel finds no socket for the quote and drops the error. A UDP
 * client then waits for an answer instead of getting ECONNREFUSED, and a TCP flow through
 * a link with a smaller MTU never learns the path MTU. kube-proxy's conntrack turns such
 * errors back (RELATED packets); so does svc_icmp_error: the quoted header becomes the
 * client's own (frontend address and port, the client's own source port where the wire
 * port differed), and the outer source becomes the frontend, as netfilter's reply
 * translation of a DNAT flow does (the client cannot tell who sent the error, as with
 * kube-proxy).
 *
 * The flow is found by the quoted tuple on its REVNAT entry (conntrack.h), in the flow's
 * opening direction. The quoted L4 checksum is left as it was: an error quotes 8 bytes of
 * a TCP header (no checksum) and no receiver checks a quoted UDP checksum; the quoted IPv4
 * header's checksum and the ICMP checksum are kept right. Hairpin flows (the client is its
 * own backend, source masqueraded) and quotes with IP options are left alone. */
#pragma once

#include "common.h"
#include "conntrack.h"
#include "nat.h"
#include "parse.h"

#define SVC_ICMP_NOT_MINE (-1)
#define ICMP_TIME_EXCEEDED 11 /* also in policy.h and snat.h: identical definitions */
#define ICMP_PARAMETERPROB 12

/* Type field of an ICMP error about a packet (the types whose body quotes it). */
static __always_inline bool icmp_is_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

/* p: a first fragment (or whole packet) of ICMP going into a pod. Returns 0 when it was an
 * error about one of the pod's service flows and was turned back, a drop reason when the
 * rewrite failed, SVC_ICMP_NOT_MINE otherwise (the caller goes on as before). */
static __always_inline int svc_icmp_error(struct __sk_buff *skb, const struct pkt *p, __u64 now)
{
	if (!p->first_frag || p->proto != IPPROTO_ICMP)
		return SVC_ICMP_NOT_MINE;
	__u32 off = p->l4_off & 0x7f;
	/* ICMP header (8) + quoted IPv4 header without options (20) + quoted ports (4). */
	if (bpf_skb_pull_data(skb, off + 8 + 20 + 4))
		return SVC_ICMP_NOT_MINE;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 *icmp = data + off;
	struct iphdr *in = data + off + 8;
	__be32 *inports = (__be32 *)(in + 1);

	if ((void *)(inports + 1) > data_end || !icmp_is_error(icmp[0]))
		return SVC_ICMP_NOT_MINE;
	/* The quote is the pod's own packet: its source is the pod the error goes to. */
	if (in->ihl != 5 || in->saddr != p->daddr || (in->frag_off & bpf_htons(0x1fff)))
		return SVC_ICMP_NOT_MINE;
	__u8 proto = in->protocol;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP)
		return SVC_ICMP_NOT_MINE;
	__be16 sport = ((__be16 *)inports)[0];
	__be16 dport = ((__be16 *)inports)[1];

	struct ct_key k;
	bool from_a;
	ct_flow_key(&k, in->saddr, sport, in->daddr, dport, proto, &from_a);
	struct ct_value *ct = ct_lookup(&k, now);
	if (!ct || (ct->flags & (CT_F_REVNAT | CT_F_HAIRPIN)) != CT_F_REVNAT || ct_is_reply(ct, from_a))
		return SVC_ICMP_NOT_MINE;

	__be32 frontend = ct->nat_addr;
	__be32 old_ports = *inports;
	__be32 new_ports;
	((__be16 *)&new_ports)[0] = ct->nat_sport;
	((__be16 *)&new_ports)[1] = ct->nat_port;
	__be16 old_in_check = in->check;
	__be16 new_in_check = csum_replace4(old_in_check, in->daddr, frontend);
	__be16 *icmp_check = (__be16 *)(icmp + 2);
	__u16 check = *icmp_check;

	/* The ICMP checksum covers the quote: every changed word moves it. */
	check = csum_replace4(check, in->daddr, frontend);
	check = csum_replace4(check, old_in_check, new_in_check);
	check = csum_replace4(check, old_ports, new_ports);
	in->daddr = frontend;
	in->check = new_in_check;
	*inports = new_ports;
	*icmp_check = check;
	/* Outer source: the frontend (ICMP has no pseudo header; only the IPv4 sum moves). */
	if (nat_rewrite(skb, p, false, frontend, 0))
		return REASON_DROP_NAT_FAILED;
	return 0;
}
