// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Programs on the host side of a pod's veth.
 *
 *   tern_from_pod  (ingress: packets the pod sends)   service DNAT, hairpin, reject
 *   tern_to_pod    (egress:  packets for the pod)     reverse NAT of service replies
 *
 * Each stage is a small inline function in bpf/lib; these entry points read as the
 * pipeline. Anything that is not service traffic leaves untouched. */

#include "lib/common.h"
#include "lib/config.h"
#include "lib/metrics.h"
#include "lib/parse.h"
#include "lib/frag.h"
#include "lib/conntrack.h"
#include "lib/lb.h"
#include "lib/nat.h"
#include "lib/revnat.h"
#include "lib/reject.h"

char __license[] SEC("license") = "Dual BSD/GPL";

static __always_inline bool has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

static __always_inline int reject(struct __sk_buff *skb, const struct pkt *p)
{
	bool ok = false;
	int verdict;

	if (!p->first_frag)
		return drop(skb, REASON_SVC_REJECT, DIR_FROM_POD);
	if (p->proto == IPPROTO_TCP)
		verdict = reject_tcp(skb, p, &ok);
	else
		verdict = reject_icmp(skb, p, &ok);
	count(skb, ok ? REASON_SVC_REJECT : REASON_DROP_REJECT_FAILED, DIR_FROM_POD);
	return ok ? verdict : TC_ACT_SHOT;
}

/* A hairpin flow's reply: the pod answers the hairpin address, and the packet must go back
 * into the same pod as VIP -> client. */
static __always_inline int hairpin_reply(struct __sk_buff *skb, const struct pkt *p)
{
	struct revnat_hit hit;
	__u64 now = ct_now();

	if (!has_ports(p->proto) ||
	    !revnat_find(p->saddr, p->sport, p->saddr, p->dport, p->proto, now, &hit) ||
	    !(hit.ct->flags & CT_F_HAIRPIN))
		return TC_ACT_OK;
	ct_touch(hit.ct, now, p->proto, p->tcp_flags, true);
	if (nat_rewrite(skb, p, false, hit.vip, hit.vport) ||
	    nat_rewrite(skb, p, true, p->saddr, p->dport) || swap_eth(skb))
		return drop(skb, REASON_DROP_NAT_FAILED, DIR_FROM_POD);
	count(skb, REASON_SVC_HAIRPIN, DIR_FROM_POD);
	return bpf_redirect(skb->ifindex, 0);
}

/* Conntrack entry for a new flow to svc: pick a backend and remember it. */
static __always_inline int ct_create(struct __sk_buff *skb, const struct pkt *p,
				     const struct ct_key *k, const struct svc_value *svc,
				     __u64 now, struct ct_value *out)
{
	struct backend_value *be = lb_pick_backend(svc);

	if (!be)
		return REASON_DROP_NO_BACKEND_SLOT;
	__builtin_memset(out, 0, sizeof(*out));
	out->backend_addr = be->addr;
	out->backend_port = be->port;
	out->svc_id = svc->id;
	if (be->addr == p->saddr)
		out->flags = CT_F_HAIRPIN;
	out->expires_ns = now + ct_lifetime_ns(p->proto, out->flags);
	if (bpf_map_update_elem(&tern_ct, k, out, BPF_ANY))
		return REASON_DROP_CT_FULL;
	return 0;
}

/* Parse; on anything but an IPv4 packet to work on, set the verdict (pass what is not
 * IPv4, drop malformed IPv4 with its reason) and return false. */
static __always_inline bool parse_or_verdict(struct __sk_buff *skb, struct pkt *p, __u8 dir, int *verdict)
{
	switch (parse_packet(skb, p)) {
	case PARSE_OK:
		return true;
	case PARSE_NOT_IPV4:
		*verdict = TC_ACT_OK;
		return false;
	case PARSE_TRUNCATED:
		*verdict = drop(skb, REASON_DROP_TRUNCATED, dir);
		return false;
	default:
		*verdict = drop(skb, REASON_DROP_BAD_IP, dir);
		return false;
	}
}

SEC("tc")
int tern_from_pod(struct __sk_buff *skb)
{
	struct pkt p;

	int verdict;

	if (!parse_or_verdict(skb, &p, DIR_FROM_POD, &verdict))
		return verdict;
	if (!frag_ports(&p))
		return drop(skb, REASON_DROP_FRAG_NO_HEAD, DIR_FROM_POD);
	if (p.daddr == CFG_HAIRPIN_IP)
		return hairpin_reply(skb, &p);
	if (!has_ports(p.proto))
		return TC_ACT_OK;

	struct svc_value *svc = lb_lookup_service(p.daddr, p.dport, p.proto);
	if (!svc)
		return TC_ACT_OK;

	struct ct_key k = { .saddr = p.saddr, .daddr = p.daddr, .sport = p.sport,
			    .dport = p.dport, .proto = p.proto };
	struct ct_value flow;
	__u64 now = ct_now();
	struct ct_value *ct = ct_lookup(&k, now);
	if (ct) {
		ct_touch(ct, now, p.proto, p.tcp_flags, false);
		flow = *ct;
	} else {
		if (svc->backend_count == 0)
			return reject(skb, &p);
		int reason = ct_create(skb, &p, &k, svc, now, &flow);
		if (reason)
			return drop(skb, reason, DIR_FROM_POD);
	}

	if (p.proto == IPPROTO_SCTP && flow.backend_port != p.dport)
		return drop(skb, REASON_DROP_SCTP_PORT, DIR_FROM_POD);
	if (nat_rewrite(skb, &p, true, flow.backend_addr, flow.backend_port))
		return drop(skb, REASON_DROP_NAT_FAILED, DIR_FROM_POD);
	if (flow.flags & CT_F_HAIRPIN) {
		if (nat_rewrite(skb, &p, false, CFG_HAIRPIN_IP, p.sport) || swap_eth(skb))
			return drop(skb, REASON_DROP_NAT_FAILED, DIR_FROM_POD);
		count(skb, REASON_SVC_HAIRPIN, DIR_FROM_POD);
		return bpf_redirect(skb->ifindex, 0);
	}
	count(skb, REASON_SVC_FORWARD, DIR_FROM_POD);
	return TC_ACT_OK;
}

SEC("tc")
int tern_to_pod(struct __sk_buff *skb)
{
	struct pkt p;
	struct revnat_hit hit;
	int verdict;

	if (!parse_or_verdict(skb, &p, DIR_TO_POD, &verdict))
		return verdict;
	/* A fragment whose head was not seen here cannot be a reply we translated: pass. */
	if (!frag_ports(&p) || !has_ports(p.proto))
		return TC_ACT_OK;
	__u64 now = ct_now();
	if (!revnat_find(p.saddr, p.sport, p.daddr, p.dport, p.proto, now, &hit))
		return TC_ACT_OK;

	ct_touch(hit.ct, now, p.proto, p.tcp_flags, true);
	if (p.proto == IPPROTO_SCTP && hit.vport != p.sport)
		return drop(skb, REASON_DROP_SCTP_PORT, DIR_TO_POD);
	if (nat_rewrite(skb, &p, false, hit.vip, hit.vport))
		return drop(skb, REASON_DROP_NAT_FAILED, DIR_TO_POD);
	count(skb, REASON_SVC_REVNAT, DIR_TO_POD);
	return TC_ACT_OK;
}
