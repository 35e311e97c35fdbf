/* Service translation on top of conntrack (conntrack.h) and the LB maps (lb.h).
 *
 *   flow_lookup   the one conntrack lookup of a packet's wire tuple
 *   svc_flow      a client's packet to a frontend: its established flow, or a new one
 *   svc_translate DNAT to the flow's backend (and source port, if the wire tuple had to change)
 *   flow_track    any other packet: refresh or open its entry
 *   svc_restore   a backend's reply found on a REVNAT entry: back to frontend -> client
 *
 * Both entries of a service flow (SVC: the client's tuple; REVNAT: the translated one) can
 * be rebuilt from each other (svc_keep_pair). Every client packet looks the REVNAT half up
 * and rebuilds it if the LRU took it (an idle flow can lose one half and keep the other);
 * the halves merge their state whenever either pushes its deadline. A client packet whose
 * SVC half is gone finds its backend through the REVNAT half (svc_recover_slot). */
#pragma once

#include "common.h"
#include "config.h"
#include "conntrack.h"
#include "lb.h"
#include "nat.h"

#define SVC_PORT_TRIES 8

/* A packet's conntrack entry, found by its wire tuple. */
struct flow {
	struct ct_key key;
	struct ct_value *ct; /* NULL: no live entry */
	bool from_a;         /* the packet's sender is side a of key */
	__u16 policy;        /* no entry yet: the verdicts (ct_policy_flag) to create it with */
};

static __always_inline void flow_lookup(const struct pkt *p, __u64 now, struct flow *f)
{
	ct_flow_key(&f->key, p->saddr, p->sport, p->daddr, p->dport, p->proto, &f->from_a);
	f->ct = ct_lookup(&f->key, now);
	f->policy = 0;
}

/* The two sides of a key, loaded into registers before choosing one. Choosing with
 * `c ? k->x : k->y` or an array index lets clang select between stack addresses, which the
 * verifier refuses; a select between loaded values is fine. */
struct ct_side {
	__be32 addr;
	__be16 port;
};

static __always_inline struct ct_side ct_side_of(const struct ct_key *k, bool b)
{
	__be32 aa = k->addr_a, ab = k->addr_b;
	__be16 pa = k->port_a, pb = k->port_b;

	asm volatile("" : "+r"(aa), "+r"(ab), "+r"(pa), "+r"(pb));
	struct ct_side s = { .addr = b ? ab : aa, .port = b ? pb : pa };
	return s;
}

/* The address a service flow's client has on the wire: itself, or the hairpin address when
 * the backend is the client. */
static __always_inline __be32 svc_wire_client(__be32 client, __u16 flags)
{
	return (flags & CT_F_HAIRPIN) ? CFG_HAIRPIN_IP : client;
}

/* Whether an established SVC entry must give way to a new backend choice: a UDP flow whose
 * backend left the frontend (a long-lived socket must not keep sending to it), or a new TCP
 * connection (a SYN) on a reused tuple whose old flow closed or whose backend left. */
static __always_inline bool svc_must_repick(const struct ct_value *ct, const struct pkt *p)
{
	if (p->proto == IPPROTO_TCP) {
		if (!is_pure_syn(p->tcp_flags))
			return false;
		if (ct->flags & CT_F_CLOSING)
			return true;
	}
	return !lb_is_member(ct->svc_id, ct->nat_addr, ct->nat_port);
}

/* Merge the TCP state of the two halves and give both the same deadline. */
static __always_inline void svc_merge(struct ct_value *a, struct ct_value *b, __u8 proto, __u64 now)
{
	__u16 st = (a->flags | b->flags) & (CT_F_SEEN_REPLY | CT_F_CLOSING);
	__u64 deadline = now + ct_lifetime_ns(proto, st);

	a->flags |= st;
	b->flags |= st;
	a->expires_ns = deadline;
	b->expires_ns = deadline;
}

#define SVC_PAIR_FLAGS (CT_F_SEEN_REPLY | CT_F_CLOSING | CT_F_HAIRPIN | CT_F_PORT_SNAT)

/* Keep a service flow's two entries together. sk/svc is the SVC entry (svc_client_b: the
 * client is side b of sk), fk/rev the REVNAT entry (rev_client_b: the client's wire side is
 * side b of fk). Whichever the packet found is non-NULL; the other is looked up and, when
 * merge is set, merged, or rebuilt from the one at hand if the LRU took it. */
static __always_inline bool svc_keep_pair(const struct ct_key *sk, struct ct_value *svc, bool svc_client_b,
					  const struct ct_key *fk, struct ct_value *rev, bool rev_client_b,
					  __u8 proto, __u64 now, bool merge)
{
	struct ct_value v = {};

	/* An entry of the wrong kind at the other key is not the other half: a packet that
	 * found neither half (a backend's reply after the LRU took the REVNAT half) was tracked
	 * as a plain flow there. It is overwritten, or the pair would stay broken. */
	if (svc) {
		struct ct_side client = ct_side_of(sk, svc_client_b);
		struct ct_side front = ct_side_of(sk, !svc_client_b);

		rev = bpf_map_lookup_elem(&tern_conntrack, fk);
		if (rev && (rev->flags & CT_F_REVNAT)) {
			/* Another service flow's half: a newer flow of this client took the wire
			 * tuple while the LRU had taken this one's REVNAT half, so its open saw
			 * no collision (docs/architecture.md, "Collision"). Left to the caller. */
			if (rev->nat_addr != front.addr || rev->nat_port != front.port ||
			    rev->nat_sport != client.port)
				return true;
			if (merge)
				svc_merge(svc, rev, proto, now);
			return false;
		}

		v.expires_ns = svc->expires_ns;
		v.nat_addr = front.addr;
		v.nat_port = front.port;
		v.nat_sport = client.port;
		v.svc_id = svc->svc_id;
		v.flags = (svc->flags & SVC_PAIR_FLAGS) | CT_F_REVNAT | (rev_client_b ? CT_F_ORIGIN_B : 0);
		bpf_map_update_elem(&tern_conntrack, fk, &v, BPF_ANY);
		return false;
	}
	svc = bpf_map_lookup_elem(&tern_conntrack, sk);
	if (svc && (svc->flags & CT_F_SVC)) {
		if (merge)
			svc_merge(svc, rev, proto, now);
		return false;
	}
	struct ct_side backend = ct_side_of(fk, !rev_client_b);
	struct ct_side wire = ct_side_of(fk, rev_client_b);

	v.expires_ns = rev->expires_ns;
	v.nat_addr = backend.addr;
	v.nat_port = backend.port;
	v.nat_sport = wire.port;
	v.svc_id = rev->svc_id;
	v.flags = (rev->flags & SVC_PAIR_FLAGS) | CT_F_SVC | (svc_client_b ? CT_F_ORIGIN_B : 0);
	bpf_map_update_elem(&tern_conntrack, sk, &v, BPF_ANY);
	return false;
}

/* The SVC key of a service flow, rebuilt from its REVNAT entry (fk, rev): the client is the
 * side that opened the flow, or for a hairpin flow (whose client is the backend itself) the
 * other side. */
static __always_inline void svc_key_of_rev(struct ct_key *sk, bool *client_b, const struct ct_key *fk,
					   const struct ct_value *rev)
{
	bool b = !!(rev->flags & CT_F_ORIGIN_B);
	bool client_a;

	if (rev->flags & CT_F_HAIRPIN)
		b = !b;
	ct_flow_key(sk, ct_side_of(fk, b).addr, rev->nat_sport, rev->nat_addr, rev->nat_port,
		    fk->proto, &client_a);
	*client_b = !client_a;
}

/* A client's packet sent straight to a backend, from the port a service flow of its own used
 * on the wire: the packet (not a reply) found that flow's REVNAT half at its tuple. A client
 * never sends there for the service flow (its packets go to the frontend), so its kernel has
 * a new connection on the tuple: a TCP SYN after the service flow closed (SO_LINGER 0 frees
 * the port at once), or a UDP socket talking to the backend itself. The old flow is over: its
 * REVNAT half would turn the new flow's replies into the frontend's, which the client drops.
 * Its SVC half is deleted too, so that a late packet of the old flow opens a new service flow
 * (on another wire port, the tuple being live) instead of rebuilding the REVNAT half over the
 * new flow; f->ct is cleared, so the packet opens a plain entry in its place. A TCP segment
 * without SYN is left alone (it cannot open a flow); SCTP too (a port change is impossible
 * for it, so a live service flow would be lost: rare enough to keep as it is). */
static __always_inline void svc_end_by_direct(const struct pkt *p, struct flow *f)
{
	struct ct_value *ct = f->ct;
	struct ct_key sk;
	bool client_b;

	if (!ct || !(ct->flags & CT_F_REVNAT) || ct_is_reply(ct, f->from_a))
		return;
	if (p->proto == IPPROTO_TCP ? !is_pure_syn(p->tcp_flags) : p->proto != IPPROTO_UDP)
		return;
	svc_key_of_rev(&sk, &client_b, &f->key, ct);
	bpf_map_delete_elem(&tern_conntrack, &sk);
	f->ct = NULL;
}

#define SVC_RECOVER_SLOTS 8

static __always_inline __u32 svc_recover_slot(const struct pkt *p, const struct svc_value *svc,
					      __u64 now)
{
	if (p->proto != IPPROTO_TCP || (p->tcp_flags & TCP_FLAG_SYN))
		return 0;
	/* Unrolled: Linux 6.1's verifier refuses this loop's back-edge (newer ones accept it). */
#pragma unroll
	for (__u32 slot = 1; slot <= SVC_RECOVER_SLOTS; slot++) {
		if (slot > svc->backend_count)
			break;
		struct backend_value *be = lb_backend(svc->id, slot);
		if (!be)
			break;
		struct ct_key fk;
		bool client_is_a;

		ct_flow_key(&fk, svc_wire_client(p->saddr, be->addr == p->saddr ? CT_F_HAIRPIN : 0),
			    p->sport, be->addr, be->port, p->proto, &client_is_a);
		struct ct_value *old = ct_lookup(&fk, now);
		if (old && (old->flags & CT_F_REVNAT) && old->nat_addr == p->daddr &&
		    old->nat_port == p->dport && old->nat_sport == p->sport)
			return slot;
	}
	return 0;
}


/* The backend slot a new flow of p takes at svc: the one a lost SVC entry had (a TCP flow
 * whose REVNAT half survived), else lb_pick_backend's choice. */
static __always_inline __u32 svc_pick_slot(const struct pkt *p, const struct svc_value *svc, __u64 now)
{
	__u32 slot = svc_recover_slot(p, svc, now);

	if (!slot)
		slot = lb_pick_backend(svc, lb_tuple_hash(p->saddr, p->daddr, p->sport, p->dport, p->proto),
				       p->saddr, now);
	return slot;
}

/* Open a new service flow from p (its SVC key in f) to svc: claim its wire
 * tuple and write both entries (REVNAT first, so a reply can never arrive before its entry).
 * When the wire tuple is another live flow's, the source port changes, taken from the
 * collision range. Returns a reason to drop, or 0 with the flow's SVC entry in *out.
 * svc_open_to takes the backend already chosen (the netdev path picks first: whether the
 * backend is local decides how the flow is translated, nodeport.h); svc_open chooses it. */
static __always_inline int svc_open_to(const struct pkt *p, const struct flow *f,
				       const struct svc_value *svc, const struct backend_value *be,
				       __u64 now, struct ct_value *out)
{

	__u16 flags = be->addr == p->saddr ? CT_F_HAIRPIN : 0;
	__be32 wire_client = svc_wire_client(p->saddr, flags);
	__be16 sport = p->sport;
	struct ct_key fk;
	bool client_is_a;

	/* Unrolled: Linux 6.1's verifier refuses this loop's back-edge (newer ones accept it). */
#pragma unroll
	for (int i = 0; i < SVC_PORT_TRIES; i++) {
		ct_flow_key(&fk, wire_client, sport, be->addr, be->port, p->proto, &client_is_a);
		struct ct_value *old = ct_lookup(&fk, now);
		/* Free, or this very client flow's own (its SVC entry expired or was evicted). */
		if (!old || ((old->flags & CT_F_REVNAT) && old->nat_addr == p->daddr &&
			     old->nat_port == p->dport && old->nat_sport == p->sport))
			goto claim;
		if (p->proto == IPPROTO_SCTP)
			return REASON_DROP_CT_COLLISION; /* its CRC32c forbids a port change */
		flags |= CT_F_PORT_SNAT;
		sport = bpf_htons(CFG_COLLISION_PORT_MIN +
				  bpf_get_prandom_u32() % CFG_COLLISION_PORT_COUNT);
	}
	return REASON_DROP_CT_COLLISION;

claim:;
	struct ct_value rev = {
		.nat_addr = p->daddr,
		.nat_port = p->dport,
		.nat_sport = p->sport,
		.svc_id = svc->id,
		.flags = flags | CT_F_REVNAT | (client_is_a ? 0 : CT_F_ORIGIN_B),
	};
	rev.expires_ns = now + ct_lifetime_ns(p->proto, 0);
	if (ct_create(&fk, &rev))
		return REASON_DROP_CT_FULL;

	__builtin_memset(out, 0, sizeof(*out));
	out->expires_ns = rev.expires_ns;
	out->nat_addr = be->addr;
	out->nat_port = be->port;
	out->nat_sport = sport;
	out->svc_id = svc->id;
	out->flags = flags | CT_F_SVC | (f->from_a ? 0 : CT_F_ORIGIN_B);
	if (ct_create(&f->key, out))
		return REASON_DROP_CT_FULL;
	return 0;
}

static __always_inline int svc_open(const struct pkt *p, const struct flow *f,
				    const struct svc_value *svc, __u64 now, struct ct_value *out)
{
	struct backend_value *be = lb_backend(svc->id, svc_pick_slot(p, svc, now));

	if (!be)
		return REASON_DROP_NO_BACKEND_SLOT;
	return svc_open_to(p, f, svc, be, now, out);
}

/* The flow of a client's packet whose SVC entry f found: refresh it, make sure its REVNAT
 * half is there, and return 0 with the flow in *out, SVC_REPICK when a new backend must
 * be chosen (svc_must_repick), or SVC_COLLIDED when a newer flow of the client holds the
 * flow's wire tuple (svc_keep_pair). */
#define SVC_REPICK (-2)
#define SVC_COLLIDED (-3)

static __always_inline int svc_established(const struct pkt *p, struct flow *f, __u64 now,
					   struct ct_value *out)
{
	struct ct_value *ct = f->ct;

	if (svc_must_repick(ct, p))
		return SVC_REPICK;
	bool moved = ct_touch(ct, now, p->proto, p->tcp_flags, false);
	struct ct_key fk;
	bool client_is_a;

	/* Every packet looks the REVNAT half up, and rebuilds it if the LRU took it: the
	 * backend's reply needs it, and an idle flow's halves can be evicted one without the
	 * other (the deadline moves only every sixteenth of the lifetime, 22 minutes for an
	 * established TCP flow, far too rarely to catch the gap). The lookup also marks the
	 * half referenced, so the LRU keeps it while the client sends. The two merge their
	 * state only when the deadline moves, or until the flow is established (the reply's
	 * mark is on the REVNAT half), so that established packets write nothing. */
	ct_flow_key(&fk, svc_wire_client(p->saddr, ct->flags), ct->nat_sport,
		    ct->nat_addr, ct->nat_port, p->proto, &client_is_a);
	if (svc_keep_pair(&f->key, ct, !f->from_a, &fk, NULL, !client_is_a, p->proto, now,
			  moved || (p->proto == IPPROTO_TCP && !(ct->flags & CT_F_SEEN_REPLY))))
		return SVC_COLLIDED;
	*out = *ct;
	return 0;
}

static __always_inline int svc_translate(struct __sk_buff *skb, const struct pkt *p,
					 const struct ct_value *flow)
{
	if (p->proto == IPPROTO_SCTP && flow->nat_port != p->dport)
		return REASON_DROP_SCTP_PORT;
	if (nat_rewrite(skb, p, true, flow->nat_addr, flow->nat_port))
		return REASON_DROP_NAT_FAILED;
	if (nat_rewrite(skb, p, false, svc_wire_client(p->saddr, flow->flags), flow->nat_sport))
		return REASON_DROP_NAT_FAILED;
	return 0;
}


static __always_inline int svc_restore(struct __sk_buff *skb, const struct pkt *p,
				       const struct ct_value *flow)
{
	__be32 client = (flow->flags & CT_F_HAIRPIN) ? p->saddr : p->daddr;

	if (p->proto == IPPROTO_SCTP && flow->nat_port != p->sport)
		return REASON_DROP_SCTP_PORT;
	if (nat_rewrite(skb, p, false, flow->nat_addr, flow->nat_port))
		return REASON_DROP_NAT_FAILED;
	if (nat_rewrite(skb, p, true, client, flow->nat_sport))
		return REASON_DROP_NAT_FAILED;
	return 0;
}


/* A packet that is not a client's packet to a frontend: refresh its entry (keeping a service
 * flow's other half warm) or open one with the sender as the side that opened the flow.
 * *reply tells whether the packet travels against the flow's opening direction. Returns a
 * reason to drop, or 0. */
static __always_inline int flow_track(const struct pkt *p, __u64 now, struct flow *f, bool *reply)
{
	struct ct_value *ct = f->ct;

	if (!ct) {
		struct ct_value v = { .policy = f->policy };

		if (!f->from_a)
			v.flags |= CT_F_ORIGIN_B;
		/* A TCP segment without SYN belongs to a flow older than its entry (an upgrade,
		 * an eviction): take it as established. */
		if (p->proto == IPPROTO_TCP && !(p->tcp_flags & TCP_FLAG_SYN))
			v.flags |= CT_F_SEEN_REPLY;
		v.expires_ns = now + ct_lifetime_ns(p->proto, v.flags);
		*reply = false;
		if (bpf_map_update_elem(&tern_conntrack, &f->key, &v, BPF_ANY))
			return REASON_DROP_CT_FULL;
		return 0;
	}
	*reply = ct_is_reply(ct, f->from_a);
	if (ct_touch(ct, now, p->proto, p->tcp_flags, *reply) && (ct->flags & CT_F_REVNAT)) {
		struct ct_key sk;
		bool client_b;

		svc_key_of_rev(&sk, &client_b, &f->key, ct);
		svc_keep_pair(&sk, NULL, client_b, &f->key, ct, !!(ct->flags & CT_F_ORIGIN_B), p->proto, now, true);
	}
	return 0;
}
