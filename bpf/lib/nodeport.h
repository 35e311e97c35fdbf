/* NodePort, LoadBalancer IP and externalIP frontends (SVC_F_EXTERNAL in tern_services) for
 * clients outside the node, on the node's network devices.
 *
 *   np_from_netdev  a packet arriving from the VPC:
 *                   - a remote backend's reply on a SNAT flow (to CFG_NODEPORT_ADDR): back to
 *                     frontend -> client, out by the FIB
 *                   - a client's packet to an external frontend: its established flow, or a
 *                     new one (source ranges, no endpoint -> drop or REJECT, backend pick)
 *   np_to_netdev    a local backend's reply leaving for its external client: back to
 *                   frontend -> client, out of the interface the FIB names for it
 *
 * Two ways through, chosen per flow by where the picked backend lives (tern_ipcache's
 * IPC_F_LOCAL):
 *   - local backend: DNAT only (the client's address is kept, as Cilium does and as
 *     externalTrafficPolicy Local requires). The flow is an ordinary service flow of svc.h
 *     (an SVC entry for the client's tuple, a REVNAT entry for the translated one), so the
 *     pod programs track it, NetworkPolicy sees the real client, and the backend's reply is
 *     restored when it leaves the node (np_to_netdev).
 *   - remote backend (externalTrafficPolicy Cluster): DNAT and SNAT to CFG_NODEPORT_ADDR, as
 *     kube-proxy does, so the reply comes back through this node. The client's tuple has an
 *     SVC entry marked CT_F_SNAT (nat_sport is the port on the wire, the address is always
 *     CFG_NODEPORT_ADDR); the reply finds the client and the frontend in tern_nodeport_snat
 *     by the translated tuple, with one lookup.
 * The translated packet leaves by bpf_redirect_neigh to the FIB's device: the stack would
 * drop it (its source is one of the node's own addresses). ICMP errors about these flows
 * are turned back to what the client sent (svcicmp.h): np_icmp_in for a remote backend's
 * (or a router's) about a SNAT flow, np_icmp_out for a local backend's. Not handled here:
 * later fragments (no ports), SCTP, DSR and XDP. */
#pragma once

#include "common.h"
#include "conntrack.h"
#include "endpoint.h"
#include "lb.h"
#include "metrics.h"
#include "nat.h"
#include "policy.h"
#include "portclaim.h"
#include "reject.h"
#include "snat.h"
#include "svc.h"
#include "svcicmp.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* The node address external clients' flows to remote backends are translated to (network
 * order): the primary NIC's. 0 turns the netdev path for external frontends off (they are
 * then served only to pods and host processes). Ports come from the masquerade range
 * (CFG_SNAT_PORT_MIN/COUNT, CFG_SNAT_TRIES; the client's own port first). */
volatile const __be32 CFG_NODEPORT_ADDR = 0;

struct np_rev {
	__u64 expires_ns;  /* by the flow's state (ct_lifetime_ns); expired = free */
	__be32 client_addr;
	__be32 front_addr; /* the frontend the client reached: replies come from it */
	__be16 client_port;
	__be16 front_port;
	__u16 flags;       /* CT_F_SEEN_REPLY, CT_F_CLOSING */
	__u16 pad;
};

/* tern_nodeport_snat: key ct_key (the translated wire tuple: CFG_NODEPORT_ADDR and the
 * allocated port, backend address and port, protocol; canonical order), value np_rev (client
 * and frontend). One entry per external client's flow to a remote backend (or to an
 * exclusive-ENI pod of this node, exclusive.h). LRU, 131072
 * entries (size from the loader): an idle flow's entry may be evicted under pressure, which
 * ends that flow; expired entries are free to the allocator, so no GC is needed. Writer:
 * from-netdev (claim, refresh), from-pod (an exclusive-ENI pod's flows, exclusive.h).
 * Readers: from-netdev (a remote backend's replies), from-pod (an exclusive-ENI backend's
 * replies, exclusive.h), ternctl. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct np_rev);
	__uint(max_entries, 131072);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_nodeport_snat SEC(".maps");

/* Send a translated packet where the FIB says its destination is. egress: the program runs
 * on the device's egress, where a packet staying on it just goes on. */
static __always_inline int np_redirect(struct __sk_buff *skb, bool egress, __u8 dir)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end)
		return drop(skb, REASON_DROP_TRUNCATED, dir);
	struct bpf_fib_lookup fib;
	/* Zeroed whole, then filled (see forward.h). */
	__builtin_memset(&fib, 0, sizeof(fib));
	fib.family = AF_INET;
	fib.l4_protocol = ip->protocol;
	fib.ifindex = skb->ifindex;
	fib.tos = ip->tos;
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return drop(skb, REASON_DROP_NODEPORT_NO_ROUTE, dir);
	if (egress && fib.ifindex == skb->ifindex)
		return TC_ACT_OK;
	return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
}

/* Fold a packet's TCP flags into a reverse entry; true when its state or deadline moved. */
static __always_inline bool np_touch(struct np_rev *v, __u64 now, __u8 proto, __u8 tcp_flags, bool reply)
{
	struct ct_value c = { .expires_ns = v->expires_ns, .flags = v->flags };

	if (!ct_touch(&c, now, proto, tcp_flags, reply))
		return false;
	v->flags = c.flags;
	v->expires_ns = c.expires_ns;
	return true;
}

struct np_alloc {
	__be32 backend;
	__be16 bport;
	struct np_rev v; /* the claim's value */
	struct port_claim pc;
};

/* One candidate port: claim it if free (or expired), take it back if it is this flow's. */
static long np_try(__u32 i, struct np_alloc *a)
{
	struct ct_key k;
	__be16 port;

	if (!port_claim_key(&a->pc, i, CFG_NODEPORT_ADDR, a->backend, a->bport, &k, &port))
		return 1;
	struct np_rev *old = bpf_map_lookup_elem(&tern_nodeport_snat, &k);
	if (old && old->client_addr == a->v.client_addr && old->client_port == a->v.client_port &&
	    old->front_addr == a->v.front_addr && old->front_port == a->v.front_port) {
		*old = a->v; /* this flow's own: its SVC entry was lost */
		return port_claim_done(&a->pc, port);
	}
	return port_claim_insert(&a->pc, &tern_nodeport_snat, &k, &a->v, old ? &old->expires_ns : NULL, port);
}

/* Open a SNAT flow from the client's packet p (its SVC key in f) to the remote backend be:
 * claim a port, then write the SVC entry. Returns 0 with the entry in *out, or a drop
 * reason. */
static __always_inline int np_open_snat(const struct pkt *p, const struct flow *f, const struct svc_value *svc,
					const struct backend_value *be, __u64 now, struct ct_value *out)
{
	struct np_alloc a = {
		.backend = be->addr,
		.bport = be->port,
	};

	port_claim_init(&a.pc, p, now);
	a.v.client_addr = p->saddr;
	a.v.client_port = p->sport;
	a.v.front_addr = p->daddr;
	a.v.front_port = p->dport;
	a.v.expires_ns = now + ct_lifetime_ns(p->proto, 0);
	bpf_loop(SNAT_MAX_TRIES, np_try, &a, 0);
	if (a.pc.result)
		return a.pc.result;

	__builtin_memset(out, 0, sizeof(*out));
	out->expires_ns = a.v.expires_ns;
	out->nat_addr = be->addr;
	out->nat_port = be->port;
	out->nat_sport = a.pc.port;
	out->svc_id = svc->id;
	out->flags = CT_F_SVC | CT_F_SNAT | (f->from_a ? 0 : CT_F_ORIGIN_B);
	if (bpf_map_update_elem(&tern_conntrack, &f->key, out, BPF_ANY))
		return REASON_DROP_CT_FULL;
	return 0;
}

/* The reverse entry of an established SNAT flow, refreshed; false when it is gone or no
 * longer this flow's (the caller opens the flow again). */
static __always_inline bool np_refresh(const struct pkt *p, const struct ct_value *ct, __u64 now)
{
	struct ct_key k;
	bool from_a;

	ct_flow_key(&k, CFG_NODEPORT_ADDR, ct->nat_sport, ct->nat_addr, ct->nat_port, p->proto, &from_a);
	struct np_rev *v = bpf_map_lookup_elem(&tern_nodeport_snat, &k);
	if (!v || v->expires_ns < now || v->client_addr != p->saddr || v->client_port != p->sport)
		return false;
	np_touch(v, now, p->proto, p->tcp_flags, false);
	return true;
}

static __always_inline int np_reject(struct __sk_buff *skb, const struct pkt *p)
{
	bool ok = false;
	int verdict;

	if (p->proto == IPPROTO_TCP)
		verdict = reject_tcp(skb, p, &ok);
	else
		verdict = reject_icmp(skb, p, &ok);
	count(skb, ok ? REASON_SVC_REJECT : REASON_DROP_REJECT_FAILED, DIR_FROM_NETDEV);
	return ok ? verdict : TC_ACT_SHOT;
}

/* A remote backend's reply on a SNAT flow: returns NP_NOT_MINE when p is none. */
#define NP_NOT_MINE (-1000)

/* Restore a SNAT flow's reply p to frontend -> client: 0 when done, NP_NOT_MINE when p is
 * no such reply, or a drop reason. */
static __always_inline int np_snat_restore(struct __sk_buff *skb, const struct pkt *p, __u64 now)
{
	struct ct_key k;
	bool from_a;

	ct_flow_key(&k, p->saddr, p->sport, p->daddr, p->dport, p->proto, &from_a);
	struct np_rev *v = bpf_map_lookup_elem(&tern_nodeport_snat, &k);
	if (!v || v->expires_ns < now)
		return NP_NOT_MINE;
	if (np_touch(v, now, p->proto, p->tcp_flags, true)) {
		/* The client's half learns the flow is established (its lifetime grows). */
		struct ct_key sk;
		ct_flow_key(&sk, v->client_addr, v->client_port, v->front_addr, v->front_port, p->proto, &from_a);
		struct ct_value *ct = ct_lookup(&sk, now);
		if (ct && (ct->flags & CT_F_SNAT))
			ct_touch(ct, now, p->proto, p->tcp_flags, true);
	}
	__be32 client = v->client_addr;
	__be16 client_port = v->client_port;
	if (nat_rewrite(skb, p, false, v->front_addr, v->front_port) ||
	    nat_rewrite(skb, p, true, client, client_port))
		return REASON_DROP_NAT_FAILED;
	return 0;
}

/* A restored reply (r from np_snat_restore, not NP_NOT_MINE): counted, out by the FIB. */
static __always_inline int np_snat_reply_out(struct __sk_buff *skb, int r, __u8 dir)
{
	if (r)
		return drop(skb, r, dir);
	count(skb, REASON_NODEPORT_REVNAT, dir);
	return np_redirect(skb, false, dir);
}

/* Translate a client's packet on its flow (ct: its SVC entry, as written). */
static __always_inline int np_forward(struct __sk_buff *skb, const struct pkt *p, const struct ct_value *flow)
{
	if (flow->flags & CT_F_SNAT) {
		if (nat_rewrite(skb, p, true, flow->nat_addr, flow->nat_port) ||
		    nat_rewrite(skb, p, false, CFG_NODEPORT_ADDR, flow->nat_sport))
			return drop(skb, REASON_DROP_NAT_FAILED, DIR_FROM_NETDEV);
		count(skb, REASON_NODEPORT_SNAT, DIR_FROM_NETDEV);
		return np_redirect(skb, false, DIR_FROM_NETDEV);
	}
	int reason = svc_translate(skb, p, flow);
	if (reason)
		return drop(skb, reason, DIR_FROM_NETDEV);
	/* To a local pod: the stack routes it to the pod's veth, where tern_to_pod applies
	 * the pod's ingress policy to the real client. */
	count(skb, REASON_NODEPORT_FORWARD, DIR_FROM_NETDEV);
	return TC_ACT_OK;
}

/* A client's packet that opens a flow to svc (or re-opens one, see svc_must_repick). */
static __always_inline int np_open(struct __sk_buff *skb, const struct pkt *p, const struct flow *f,
				   const struct svc_value *svc, __u64 now)
{
	if (!lb_source_allowed(svc, p->saddr))
		return drop(skb, REASON_DROP_SRC_RANGE, DIR_FROM_NETDEV);
	if (svc->backend_count == 0) {
		/* externalTrafficPolicy Local with endpoints elsewhere only: kube-proxy drops. */
		if (svc->flags & SVC_F_DROP_EMPTY)
			return drop(skb, REASON_DROP_NO_LOCAL_BACKEND, DIR_FROM_NETDEV);
		return np_reject(skb, p);
	}
	struct backend_value *be = lb_backend(svc->id, svc_pick_slot(p, svc, now));
	if (!be)
		return drop(skb, REASON_DROP_NO_BACKEND_SLOT, DIR_FROM_NETDEV);
	struct ct_value flow;
	struct ipcache_value *peer = ipcache_lookup(be->addr);
	int reason;
	/* A local exclusive-ENI pod answers only the node's address through its veth
	 * (exclusive.h): its flows are translated as a remote backend's. */
	if (peer && (peer->flags & (IPC_F_LOCAL | IPC_F_EXCLUSIVE)) == IPC_F_LOCAL)
		reason = svc_open_to(p, f, svc, be, now, &flow);
	/* A local exclusive backend sees the node, not the client: its ingress policy is
	 * judged here, against the client (policy.h). */
	else if (!(reason = policy_excl_backend(skb, p, be->addr, be->port, DIR_FROM_NETDEV)))
		reason = np_open_snat(p, f, svc, be, now, &flow);
	if (reason)
		return drop(skb, reason, DIR_FROM_NETDEV);
	return np_forward(skb, p, &flow);
}

/* An ICMP error arriving from the VPC about an external client's flow that was translated
 * to the node (its quote: node -> backend, a tern_nodeport_snat entry): the quote becomes
 * client -> frontend, the outer header frontend -> client, and it leaves where the FIB sends
 * the client's traffic. Returns the verdict, or NP_NOT_MINE. A global function: verified
 * once, apart from tern_from_netdev's other stages. */
__attribute__((noinline)) int np_icmp_in(struct __sk_buff *skb, const struct pkt *p, __u64 now)
{
	struct icmp_quote q;

	if (!skb || !p || !CFG_NODEPORT_ADDR || p->daddr != CFG_NODEPORT_ADDR)
		return NP_NOT_MINE;
	if (!icmp_quote_read(skb, p, &q) || q.saddr != CFG_NODEPORT_ADDR || q.proto == IPPROTO_SCTP)
		return NP_NOT_MINE;
	struct ct_key k;
	bool from_a;
	ct_flow_key(&k, q.saddr, q.sport, q.daddr, q.dport, q.proto, &from_a);
	struct np_rev *v = bpf_map_lookup_elem(&tern_nodeport_snat, &k);
	if (!v || v->expires_ns < now)
		return NP_NOT_MINE;
	struct icmp_quote to = {
		.saddr = v->client_addr, .sport = v->client_port, .daddr = v->front_addr, .dport = v->front_port,
	};
	int r = icmp_quote_rewrite(skb, p, &to, v->front_addr, v->client_addr);
	if (r)
		return drop(skb, r, DIR_FROM_NETDEV);
	count(skb, REASON_SVC_ICMP_ERROR, DIR_FROM_NETDEV);
	return np_redirect(skb, false, DIR_FROM_NETDEV);
}

/* An ICMP error leaving for an external client about its flow to a local backend (a backend's
 * port unreachable: the quote client -> backend, the flow's REVNAT entry): the quote becomes
 * client -> frontend and the outer source the frontend, out where the FIB sends the
 * frontend's traffic, as the backend's replies (np_to_netdev). The verdict, or NP_NOT_MINE. */
__attribute__((noinline)) int np_icmp_out(struct __sk_buff *skb, const struct pkt *p, __u64 now)
{
	if (!skb || !p || !CFG_NODEPORT_ADDR)
		return NP_NOT_MINE;
	int r = svc_icmp_error(skb, p, now);
	if (r == ICMP_NOT_MINE)
		return NP_NOT_MINE;
	if (r)
		return drop(skb, r, DIR_TO_NETDEV);
	count(skb, REASON_SVC_ICMP_ERROR, DIR_TO_NETDEV);
	return np_redirect(skb, true, DIR_TO_NETDEV);
}

/* The from-netdev stage. Returns the verdict, or NP_NOT_MINE for a packet that is none of
 * an external frontend's flows. */
static __always_inline int np_from_netdev(struct __sk_buff *skb, struct pkt *p, __u64 now)
{
	if (p->proto == IPPROTO_ICMP)
		return np_icmp_in(skb, p, now);
	if (!CFG_NODEPORT_ADDR || !p->first_frag || (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP))
		return NP_NOT_MINE;
	if (p->daddr == CFG_NODEPORT_ADDR) {
		int r = np_snat_restore(skb, p, now);
		if (r != NP_NOT_MINE)
			return np_snat_reply_out(skb, r, DIR_FROM_NETDEV);
	}
	struct flow f;
	flow_lookup(p, now, &f);
	if (f.ct) {
		if (!(f.ct->flags & CT_F_SVC) || ct_is_reply(f.ct, f.from_a))
			return NP_NOT_MINE;
		if (!svc_must_repick(f.ct, p)) {
			if (f.ct->flags & CT_F_SNAT) {
				ct_touch(f.ct, now, p->proto, p->tcp_flags, false);
				if (np_refresh(p, f.ct, now))
					return np_forward(skb, p, f.ct);
			} else {
				struct ct_value flow;
				if (svc_established(p, &f, now, &flow) == 0)
					return np_forward(skb, p, &flow);
			}
		}
	}
	struct svc_value *svc = lb_lookup_service(p->daddr, p->dport, p->proto);
	if (!svc || !(svc->flags & SVC_F_EXTERNAL))
		return NP_NOT_MINE;
	return np_open(skb, p, &f, svc, now);
}

/* The to-netdev stage: a local backend's reply to an external client (the REVNAT half of a
 * flow np_open gave a local backend) gets the frontend back as its source and leaves where
 * the FIB sends the frontend's traffic (the primary NIC for a node address: an ENI would
 * refuse it as a source). */
static __always_inline int np_to_netdev(struct __sk_buff *skb, struct pkt *p, __u64 now)
{
	if (p->proto == IPPROTO_ICMP)
		return np_icmp_out(skb, p, now);
	if (!CFG_NODEPORT_ADDR || !p->first_frag || (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP))
		return NP_NOT_MINE;
	struct flow f;
	flow_lookup(p, now, &f);
	if (!f.ct || !(f.ct->flags & CT_F_REVNAT) || (f.ct->flags & CT_F_HAIRPIN) || !ct_is_reply(f.ct, f.from_a))
		return NP_NOT_MINE;
	int reason = svc_restore(skb, p, f.ct);
	if (reason)
		return drop(skb, reason, DIR_TO_NETDEV);
	count(skb, REASON_NODEPORT_REVNAT, DIR_TO_NETDEV);
	return np_redirect(skb, true, DIR_TO_NETDEV);
}
