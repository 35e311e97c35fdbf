/* Connection tracking for every pod flow, found with one exact lookup of the wire tuple,
 * whichever way the packet travels.
 *
 * Every entry is keyed by a tuple as it is on the wire, in canonical order (the lower
 * address:port first), so a packet in either direction builds the same key. An entry says
 * which side opened the flow, so each packet knows whether it is a reply.
 *
 * A service flow has two entries, one per tuple it has on the wire:
 *   - the client's tuple (client -> frontend), marked CT_F_SVC: what the client's packets
 *     find; it names the backend and the source port the flow uses after translation;
 *   - the translated tuple (client -> backend), marked CT_F_REVNAT: what the backend's
 *     replies find; it names the frontend to restore and the client's own port.
 * So an established packet in either direction costs one conntrack lookup and no service
 * lookup; only a packet that finds no entry asks the frontend map whether it opens a
 * service flow.
 *
 * Keeping the pair together under map pressure: both entries live in one global LRU map,
 * each can be rebuilt from the other. Every client packet looks the REVNAT half up and
 * rebuilds it if the LRU took it; whenever a packet pushes its entry's deadline (svc.h) the
 * two merge their state. A lookup marks an LRU entry as referenced, so an active flow keeps
 * both halves warm; the LRU evicts idle flows first, but not whole: an idle flow may lose
 * either half, and its next packet repairs it. */
#pragma once

#include "common.h"
#include "config.h"
#include "metrics.h"
#include "parse.h"

struct ct_key {
	__be32 addr_a; /* lower side */
	__be32 addr_b; /* higher side */
	__be16 port_a;
	__be16 port_b;
	__u8 proto;
	__u8 pad[3];
};

enum ct_flag {
	CT_F_SEEN_REPLY = 1 << 0, /* a reply came back: established */
	CT_F_CLOSING = 1 << 1,    /* FIN or RST seen */
	CT_F_HAIRPIN = 1 << 2,    /* backend is the client itself: source masqueraded */
	CT_F_ORIGIN_B = 1 << 3,   /* side b opened the flow (else side a) */
	CT_F_REVNAT = 1 << 4,     /* the translated tuple of a service flow: replies are turned back */
	CT_F_PORT_SNAT = 1 << 5,  /* the client's source port was changed on the wire */
	CT_F_SVC = 1 << 6,        /* the client's tuple of a service flow: packets are translated */
	CT_F_SNAT = 1 << 7,       /* masqueraded (snat.h): nat_addr:nat_sport is its source on the wire */
};

struct ct_value {
	__u64 expires_ns; /* CLOCK_MONOTONIC (coarse) deadline; an expired entry is a new flow */
	__be32 nat_addr;  /* SVC: backend; REVNAT: frontend address replies come from; SNAT: masquerade address */
	__be16 nat_port;  /* SVC: backend port; REVNAT: frontend port */
	__be16 nat_sport; /* SVC: client port on the wire; REVNAT: client's own port; SNAT: port on the wire */
	__u32 svc_id;     /* frontend id at creation (lb.h), for membership checks and ternctl */
	__u16 flags;      /* enum ct_flag */
	__u16 policy;     /* enum ct_policy_flag: NetworkPolicy verdicts cached (policy.h) */
};

/* Kept apart from flags so that the policy stage never rewrites the state bits. 0 in a new
 * or rebuilt entry: a verdict is then looked up again, never assumed. */
enum ct_policy_flag {
	CT_POL_OUT = 1 << 0, /* the opener's egress policy allowed the flow */
	CT_POL_IN = 1 << 1,  /* the responder's ingress policy allowed the flow */
};

/* tern_conntrack: key ct_key, value ct_value. One entry per pod flow, two per service flow
 * (the client's tuple and the translated one), so a map of N entries holds N plain flows or
 * N/2 service flows. LRU with one global list: per-CPU lists (BPF_F_NO_COMMON_LRU) divide the
 * size between CPUs and evicted live flows from one CPU while the map was half empty.
 * Size from the loader (default 524288). Writers: both pod programs (create, refresh), the
 * to-netdev program (a masqueraded flow's translation, snat.h; ICMP echo flows).
 * Readers: pod and to-netdev programs; the agent and ternctl dump it. Pinned, so flows survive an
 * agent restart. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 524288);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_conntrack SEC(".maps");

static __always_inline __u64 ct_lifetime_ns(__u8 proto, __u16 flags)
{
	if (proto != IPPROTO_TCP)
		return (__u64)CFG_CT_UDP_TIMEOUT * NSEC_PER_SEC;
	if (flags & CT_F_CLOSING)
		return (__u64)CFG_CT_TCP_CLOSING_TIMEOUT * NSEC_PER_SEC;
	if (flags & CT_F_SEEN_REPLY)
		return (__u64)CFG_CT_TCP_ESTABLISHED_TIMEOUT * NSEC_PER_SEC;
	return (__u64)CFG_CT_TCP_SYN_TIMEOUT * NSEC_PER_SEC;
}

/* The coarse clock (tick resolution) is enough for lifetimes in seconds and far cheaper
 * than reading the clock source on every packet. One read per packet, passed around. */
static __always_inline __u64 ct_now(void)
{
	return bpf_ktime_get_coarse_ns();
}

static __always_inline bool is_pure_syn(__u8 tcp_flags)
{
	return (tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* A TCP segment of a live flow: it acknowledges something (a SYN-ACK or any later segment)
 * and is not a RST (a RST to a tuple nobody knows is the usual answer to a lost entry). */
static __always_inline bool tcp_acks_a_flow(__u8 proto, __u8 tcp_flags)
{
	return proto == IPPROTO_TCP && (tcp_flags & (TCP_FLAG_ACK | TCP_FLAG_RST)) == TCP_FLAG_ACK;
}

/* Fold the packet's TCP flags into the entry and push its deadline out. Returns true when
 * the entry changed state or its deadline moved by more than a sixteenth of its lifetime (at
 * least a second): the only times it is written, so that flows do not write shared memory
 * on every packet, and the only times the caller re-touches a service flow's other half.
 * A flow thus lives between 15/16 of its lifetime and all of it after its last packet. */
static __always_inline bool ct_touch(struct ct_value *ct, __u64 now, __u8 proto, __u8 tcp_flags,
				     bool reply)
{
	__u16 flags = ct->flags;

	if (reply)
		flags |= CT_F_SEEN_REPLY;
	if (tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		flags |= CT_F_CLOSING;
	/* A new SYN on a closing tuple is the port being reused: start over. */
	if (!reply && is_pure_syn(tcp_flags))
		flags &= ~(CT_F_CLOSING | CT_F_SEEN_REPLY);
	__u64 lifetime = ct_lifetime_ns(proto, flags);
	__u64 deadline = now + lifetime;
	if (flags != ct->flags) {
		ct->flags = flags;
		ct->expires_ns = deadline;
		return true;
	}
	__u64 slack = lifetime >> 4;
	if (slack < NSEC_PER_SEC)
		slack = NSEC_PER_SEC;
	if (deadline > ct->expires_ns + slack) {
		ct->expires_ns = deadline;
		return true;
	}
	return false;
}

static __always_inline struct ct_value *ct_lookup(const struct ct_key *k, __u64 now)
{
	struct ct_value *ct = bpf_map_lookup_elem(&tern_conntrack, k);

	if (ct && ct->expires_ns < now)
		return NULL;
	return ct;
}

/* Write the entry of a flow that starts now, and look it up at once: the lookup sets the LRU
 * node's reference bit, which an insert leaves clear. The kernel's LRU hash recycles
 * unreferenced entries first: a CPU that runs out of free nodes flushes its recent inserts
 * to the global lists (referenced ones to the active list, the others to the head of the
 * inactive list) and shrinks the inactive list from its tail. In a small table kept full by
 * busy flows, whose lookups keep their entries referenced, the inactive list is short and
 * the shrink reached the inserts just flushed: a new service flow lost its REVNAT half before
 * the backend's SYN-ACK (a 1,024-entry table lost 1-2 % of them with 1 to 4 handshakes in
 * flight per CPU, 26-30 % with 64; loader TestFreshServiceFlowsSurviveAFullTable). Referenced,
 * a new entry goes to the head of the active list, as a busy flow's does, and is recycled
 * only once a rotation has found it unused (0 to 0.01 % lost with 1 to 4 in flight, 8-9 %
 * with 64). */
static __always_inline long ct_create(const struct ct_key *k, const struct ct_value *v)
{
	long err = bpf_map_update_elem(&tern_conntrack, k, v, BPF_ANY);

	if (!err)
		bpf_map_lookup_elem(&tern_conntrack, k);
	return err;
}

/* The key of a wire tuple. *from_a tells whether the packet's sender is side a. */
static __always_inline void ct_flow_key(struct ct_key *k, __be32 saddr, __be16 sport,
					__be32 daddr, __be16 dport, __u8 proto, bool *from_a)
{
	bool a = saddr < daddr || (saddr == daddr && sport <= dport);

	k->addr_a = a ? saddr : daddr;
	k->port_a = a ? sport : dport;
	k->addr_b = a ? daddr : saddr;
	k->port_b = a ? dport : sport;
	k->proto = proto;
	k->pad[0] = k->pad[1] = k->pad[2] = 0;
	*from_a = a;
}

/* Whether a packet whose sender is side a (from_a) travels against the flow's opening
 * direction. */
static __always_inline bool ct_is_reply(const struct ct_value *ct, bool from_a)
{
	return from_a == !!(ct->flags & CT_F_ORIGIN_B);
}
