// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Programs on the host side of a pod's veth.
 *
 *   tern_from_pod  (tc ingress: what the pod sends)
 *       parse -> bandwidth (pace or police) -> fragment ports -> conntrack lookup -> hairpin reply? restore
 *             -> an exclusive-ENI backend's reply to the node's address? restore (exclusive.h)
 *             -> a service flow, or no flow and a frontend? policy on the backend, translate
 *                (an exclusive-ENI pod's flow to a remote or exclusive backend: to the node's
 *                address too)
 *             : policy, track
 *             -> forward (redirect to a local pod or out of an ENI where the route allows)
 *   tern_to_pod    (tc egress: what the pod receives)
 *       parse -> bandwidth (police) -> fragment ports -> conntrack lookup -> policy -> track
 *             -> a service flow's reply? restore
 *
 * Every TCP, UDP and SCTP flow of the pod is tracked (conntrack.h); service flows are
 * translated on the client's veth (svc.h). Each stage is a small inline function in
 * bpf/lib, so these entry points read as the pipeline. */

#include "lib/common.h"
#include "lib/config.h"
#include "lib/metrics.h"
#include "lib/parse.h"
#include "lib/frag.h"
#include "lib/conntrack.h"
#include "lib/lb.h"
#include "lib/endpoint.h"
#include "lib/nat.h"
#include "lib/svc.h"
/* Not used here: declared so that the pod object, loaded first, pins every shared map
 * (the netdev object's masquerade maps too) and Go gets their types. */
#include "lib/snat.h"
#include "lib/reject.h"
#include "lib/policy.h"
#include "lib/bandwidth.h"
#include "lib/forward.h"
#include "lib/nodeport.h"
#include "lib/exclusive.h"
#include "lib/svcicmp.h"

char __license[] SEC("license") = "Dual BSD/GPL";

static __always_inline bool has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* Answer the pod's packet with a RST (TCP) or port-unreachable, counted as why. */
static __always_inline int reject(struct __sk_buff *skb, const struct pkt *p, __u8 why)
{
	bool ok = false;
	int verdict;

	if (!p->first_frag)
		return drop(skb, why, DIR_FROM_POD);
	if (p->proto == IPPROTO_TCP)
		verdict = reject_tcp(skb, p, &ok);
	else
		verdict = reject_icmp(skb, p, &ok);
	count(skb, ok ? why : REASON_DROP_REJECT_FAILED, DIR_FROM_POD);
	return ok ? verdict : TC_ACT_SHOT;
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

/* A client's packet to a frontend (svc), on its established flow (f->ct) or opening one. */
static __always_inline int service_forward(struct __sk_buff *skb, struct pkt *p, struct flow *f,
					   const struct svc_value *svc, __u64 now)
{
	struct ct_value flow;
	int reason = SVC_REPICK;

	if (f->ct)
		reason = (f->ct->flags & CT_F_SNAT) ? excl_established(p, f, now, &flow)
						    : svc_established(p, f, now, &flow);
	/* A newer flow of this client took the flow's wire tuple (its REVNAT half had been
	 * evicted): the backend knows one connection on that tuple, the newer one. A TCP
	 * segment of the old connection is answered with a RST, so the client learns at once
	 * instead of retransmitting into the other connection; a SYN or a UDP datagram opens a
	 * new flow, whose open sees the collision and moves it to another source port. */
	if (reason == SVC_COLLIDED) {
		if (p->proto == IPPROTO_TCP && !is_pure_syn(p->tcp_flags))
			return reject(skb, p, REASON_CT_COLLISION_LATE);
		count(skb, REASON_CT_COLLISION_LATE, DIR_FROM_POD);
		reason = SVC_REPICK;
	}
	if (reason == SVC_REPICK) {
		if (!svc)
			svc = lb_lookup_internal(p->daddr, p->dport, p->proto);
		if (!svc)
			return TC_ACT_OK; /* the frontend is gone: nothing to translate to */
		if (!lb_source_allowed(svc, p->saddr))
			return drop(skb, REASON_DROP_SRC_RANGE, DIR_FROM_POD);
		if (svc->backend_count == 0) {
			/* internalTrafficPolicy Local with no local endpoint: kube-proxy drops. */
			if (svc->flags & SVC_F_DROP_EMPTY)
				return drop(skb, REASON_DROP_NO_LOCAL_BACKEND, DIR_FROM_POD);
			return reject(skb, p, REASON_SVC_REJECT);
		}
		struct backend_value *be = lb_backend(svc->id, svc_pick_slot(p, svc, now));
		if (!be)
			return drop(skb, REASON_DROP_NO_BACKEND_SLOT, DIR_FROM_POD);
		/* An exclusive-ENI pod's flow to a remote backend (exclusive.h). */
		if (excl_wants_snat(skb, p, be)) {
			/* A local exclusive backend's ingress policy sees the node: judged
			 * here against this pod (policy.h). */
			reason = policy_excl_backend(skb, p, be->addr, be->port, DIR_FROM_POD);
			if (!reason)
				reason = np_open_snat(p, f, svc, be, now, &flow);
		} else
			reason = svc_open_to(p, f, svc, be, now, &flow);
	}
	if (!reason)
		reason = policy_from_pod(skb, p, f, flow.nat_addr, flow.nat_port);
	__be32 src = (flow.flags & CT_F_SNAT) ? CFG_NODEPORT_ADDR : svc_wire_client(p->saddr, flow.flags);
	if (!reason && (p->proto == IPPROTO_SCTP && flow.nat_port != p->dport))
		reason = REASON_DROP_SCTP_PORT;
	if (!reason && (nat_rewrite(skb, p, true, flow.nat_addr, flow.nat_port) ||
			nat_rewrite(skb, p, false, src, flow.nat_sport)))
		reason = REASON_DROP_NAT_FAILED;
	if (reason)
		return drop(skb, reason, DIR_FROM_POD);
	frag_remember(p);
	/* An exclusive-ENI pod's flow to a remote backend: out by the FIB (exclusive.h). */
	if (flow.flags & CT_F_SNAT) {
		count(skb, REASON_NODEPORT_SNAT, DIR_FROM_POD);
		return np_redirect(skb, false, DIR_FROM_POD);
	}
	if (flow.flags & CT_F_HAIRPIN) {
		if (swap_eth(skb))
			return drop(skb, REASON_DROP_NAT_FAILED, DIR_FROM_POD);
		count(skb, REASON_SVC_HAIRPIN, DIR_FROM_POD);
		return bpf_redirect(skb->ifindex, 0);
	}
	count(skb, (flow.flags & CT_F_PORT_SNAT) ? REASON_SVC_PORT_SNAT : REASON_SVC_FORWARD, DIR_FROM_POD);
	return forward(skb, p, NULL, false);
}

/* A hairpin flow's reply: the pod answers the hairpin address, and the packet goes back
 * into the same pod as frontend -> client. */
static __always_inline int hairpin_reply(struct __sk_buff *skb, struct pkt *p, struct flow *f, __u64 now)
{
	bool reply;
	int reason = flow_track(p, now, f, &reply);

	if (reason)
		return drop(skb, reason, DIR_FROM_POD);
	if (!f->ct || !reply || !(f->ct->flags & CT_F_HAIRPIN) || !(f->ct->flags & CT_F_REVNAT))
		return TC_ACT_OK;
	reason = svc_restore(skb, p, f->ct);
	if (reason || swap_eth(skb))
		return drop(skb, reason ?: REASON_DROP_NAT_FAILED, DIR_FROM_POD);
	frag_remember(p);
	count(skb, REASON_SVC_HAIRPIN, DIR_FROM_POD);
	return bpf_redirect(skb->ifindex, 0);
}

SEC("tc")
int tern_from_pod(struct __sk_buff *skb)
{
	struct pkt p;
	struct flow f;
	bool reply;
	int verdict;

	if (!parse_or_verdict(skb, &p, DIR_FROM_POD, &verdict))
		return verdict;
	if (bw_egress(skb) == TC_ACT_SHOT)
		return TC_ACT_SHOT;
	if (p.proto == IPPROTO_ICMP) {
		int reason = policy_icmp(skb, &p, true);
		return reason ? drop(skb, reason, DIR_FROM_POD) : TC_ACT_OK;
	}
	/* Not trackable, or a later fragment whose head needed no translation. */
	if (!has_ports(p.proto) || !frag_ports(&p))
		return TC_ACT_OK;

	__u64 now = ct_now();
	/* An exclusive-ENI backend answering a flow translated to the node (exclusive.h). */
	if (CFG_NODEPORT_ADDR && p.daddr == CFG_NODEPORT_ADDR) {
		int r = excl_backend_reply(skb, &p, now);
		if (r != NP_NOT_MINE)
			return np_snat_reply_out(skb, r, DIR_FROM_POD);
	}
	flow_lookup(&p, now, &f);
	if (p.daddr == CFG_HAIRPIN_IP)
		return hairpin_reply(skb, &p, &f, now);
	/* A service flow's packet, or a packet with no flow to a frontend: one place, so that
	 * the verifier walks the service stages once (docs/reliability.md). */
	struct svc_value *svc = NULL;
	bool svc_flow = f.ct && (f.ct->flags & CT_F_SVC) && !ct_is_reply(f.ct, f.from_a);
	if (!svc_flow) {
		/* A new connection straight to a backend on an old service flow's wire tuple
		 * ends it. */
		svc_end_by_direct(&p, &f);
		/* Only a packet with no flow asks whether it opens a service flow. */
		if (!f.ct)
			svc = lb_lookup_internal(p.daddr, p.dport, p.proto);
	}
	if (svc_flow || svc)
		return service_forward(skb, &p, &f, svc, now);
	/* A backend's reply whose flow lost its entries to the LRU, seen where it leaves the
	 * backend: on this node it is forwarded into a local client pod without crossing that
	 * pod's to-pod hook (forward.h), which counts the same loss otherwise. */
	if (!f.ct && tcp_acks_a_flow(p.proto, p.tcp_flags))
		count(skb, REASON_CT_REPLY_LOST, DIR_FROM_POD);
	int reason = policy_from_pod(skb, &p, &f, p.daddr, p.dport);
	if (!reason)
		reason = flow_track(&p, now, &f, &reply);
	if (reason)
		return drop(skb, reason, DIR_FROM_POD);
	return forward(skb, &p, f.ct, reply);
}

/* ICMP going into a pod: an error about one of its service flows is turned back
 * (svcicmp.h), anything else meets the pod's ingress policy. A global function: the
 * verifier checks it once, not once for every state tern_to_pod reaches it with (inlined,
 * the error translation added 17 % to tern_to_pod's verification). */
__attribute__((noinline)) int to_pod_icmp(struct __sk_buff *skb, const struct pkt *p)
{
	if (!skb || !p)
		return TC_ACT_OK;
	int reason = svc_icmp_error(skb, p, ct_now());
	if (reason == 0) {
		count(skb, REASON_SVC_ICMP_ERROR, DIR_TO_POD);
		return TC_ACT_OK;
	}
	if (reason < 0)
		reason = policy_icmp(skb, p, false);
	return reason ? drop(skb, reason, DIR_TO_POD) : TC_ACT_OK;
}

SEC("tc")
int tern_to_pod(struct __sk_buff *skb)
{
	struct pkt p;
	struct flow f;
	bool reply;
	int verdict;

	/* A packet from-pod turned back into the pod (hairpin, reject) was handled there. */
	if (skb->ingress_ifindex == skb->ifindex)
		return TC_ACT_OK;
	if (!parse_or_verdict(skb, &p, DIR_TO_POD, &verdict))
		return verdict;
	if (bw_ingress(skb) == TC_ACT_SHOT)
		return TC_ACT_SHOT;
	if (p.proto == IPPROTO_ICMP)
		return to_pod_icmp(skb, &p);
	if (!has_ports(p.proto) || !frag_ports(&p))
		return TC_ACT_OK;

	__u64 now = ct_now();
	flow_lookup(&p, now, &f);
	/* A client's untranslated tuple seen coming in is not a reply to restore. */
	if (f.ct && (f.ct->flags & CT_F_SVC))
		return TC_ACT_OK;
	/* A TCP segment that acknowledges something belongs to a live flow, which has an entry
	 * unless the LRU evicted it under pressure: a service flow's reply (the SYN-ACK, or the
	 * server's first data right after the handshake) then reaches the client untranslated,
	 * the client resets it and that connection fails. Counted, so that a conntrack too
	 * small for its load is visible. */
	if (!f.ct && tcp_acks_a_flow(p.proto, p.tcp_flags))
		count(skb, REASON_CT_REPLY_LOST, DIR_TO_POD);
	int reason = policy_to_pod(skb, &p, &f);
	if (!reason)
		reason = flow_track(&p, now, &f, &reply);
	if (reason)
		return drop(skb, reason, DIR_TO_POD);
	if (!f.ct || !reply || !(f.ct->flags & CT_F_REVNAT) || (f.ct->flags & CT_F_HAIRPIN))
		return TC_ACT_OK;
	reason = svc_restore(skb, &p, f.ct);
	if (reason)
		return drop(skb, reason, DIR_TO_POD);
	frag_remember(&p);
	count(skb, REASON_SVC_REVNAT, DIR_TO_POD);
	return TC_ACT_OK;
}
