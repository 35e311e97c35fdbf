/* Connection tracking for every pod flow, found from either direction with one exact lookup
 * of the wire tuple.
 *
 * A flow on the wire has one FLOW entry, keyed by its tuple in canonical order (the lower
 * address:port first), so a packet in either direction builds the same key. The entry says
 * which side opened the flow and, for a service flow, what its replies must be turned back
 * into (the frontend, and the client's own port if the source port had to be changed).
 *
 * A service flow also has one SVC entry, keyed by what the client sent (client -> VIP):
 * the client never names the backend, so its packets need this second key to find the
 * backend and the source port the flow uses on the wire.
 *
 * Keeping the pair together under map pressure: both entries live in one global LRU map,
 * and the forward path re-reads the FLOW entry (recreating it if it was evicted) whenever it
 * pushes its own deadline (every sixteenth of the flow's lifetime, at least a second apart),
 * and on every packet until the flow is established or when it closes. A lookup marks an LRU
 * entry as referenced, so an active flow keeps both halves warm; the LRU evicts idle flows
 * first. The SVC half can only be evicted while the flow is idle; a new SVC entry for the
 * same client tuple then finds its old FLOW entry by the frontend it names (see lb.h). */
#pragma once

#include "common.h"
#include "config.h"
#include "metrics.h"
#include "parse.h"

#pragma clang diagnostic ignored "-Wfixed-enum-extension"

enum ct_kind : __u8 {
	CT_KIND_FLOW = 0, /* the wire tuple, canonical order */
	CT_KIND_SVC = 1,  /* client -> frontend, as the client sent it */
};

struct ct_key {
	__be32 addr_a; /* FLOW: lower side; SVC: client */
	__be32 addr_b; /* FLOW: higher side; SVC: frontend (VIP) */
	__be16 port_a;
	__be16 port_b;
	__u8 proto;
	enum ct_kind kind;
	__u16 pad;
};

enum ct_flag {
	CT_F_SEEN_REPLY = 1 << 0, /* a reply came back: established */
	CT_F_CLOSING = 1 << 1,    /* FIN or RST seen */
	CT_F_HAIRPIN = 1 << 2,    /* backend is the client itself: source masqueraded */
	CT_F_ORIGIN_B = 1 << 3,   /* FLOW: side b opened the flow (else side a) */
	CT_F_REVNAT = 1 << 4,     /* FLOW: a service flow; replies are turned back */
	CT_F_PORT_SNAT = 1 << 5,  /* the client's source port was changed on the wire */
};

struct ct_value {
	__u64 expires_ns; /* CLOCK_MONOTONIC (coarse) deadline; an expired entry is a new flow */
	__be32 nat_addr;  /* SVC: backend; FLOW with REVNAT: frontend address replies come from */
	__be16 nat_port;  /* SVC: backend port; FLOW with REVNAT: frontend port */
	__be16 nat_sport; /* SVC: client port on the wire; FLOW with REVNAT: client's own port */
	__u32 svc_id;     /* frontend id at creation (lb.h), for membership checks and ternctl */
	__u16 flags;      /* enum ct_flag */
	__u16 pad;
};

/* tern_conntrack: key ct_key, value ct_value. One FLOW entry per pod flow (service or not)
 * plus one SVC entry per service flow, so a map of N entries holds N plain flows or N/2
 * service flows. LRU with one global list: per-CPU lists (BPF_F_NO_COMMON_LRU) divide the
 * size between CPUs and evicted live flows from one CPU while the map was half empty.
 * Size from the loader (default 524288). Writers: both pod programs (create, refresh).
 * Readers: both pod programs; the agent and ternctl dump it. Pinned, so flows survive an
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

/* The FLOW key of a wire tuple. *from_a tells whether the packet's sender is side a. */
static __always_inline void ct_flow_key(struct ct_key *k, __be32 saddr, __be16 sport,
					__be32 daddr, __be16 dport, __u8 proto, bool *from_a)
{
	bool a = saddr < daddr || (saddr == daddr && sport <= dport);

	k->addr_a = a ? saddr : daddr;
	k->port_a = a ? sport : dport;
	k->addr_b = a ? daddr : saddr;
	k->port_b = a ? dport : sport;
	k->proto = proto;
	k->kind = CT_KIND_FLOW;
	k->pad = 0;
	*from_a = a;
}

/* Whether a packet whose sender is side a (from_a) travels against the flow's opening
 * direction. */
static __always_inline bool ct_is_reply(const struct ct_value *ct, bool from_a)
{
	return from_a == !!(ct->flags & CT_F_ORIGIN_B);
}

static __always_inline void ct_svc_key(struct ct_key *k, const struct pkt *p)
{
	k->addr_a = p->saddr;
	k->port_a = p->sport;
	k->addr_b = p->daddr;
	k->port_b = p->dport;
	k->proto = p->proto;
	k->kind = CT_KIND_SVC;
	k->pad = 0;
}
