/* Connection tracking for service flows: exactly one entry per flow, keyed by the tuple the
 * client sent (client -> VIP). The entry holds the chosen backend, so an established flow
 * keeps its backend whatever happens to the Service, and the flow's state for TCP-aware
 * lifetimes. Replies find the same entry through the reverse-NAT index (lb.h), so there is
 * never a second entry that could be evicted on its own. */
#pragma once

#include "common.h"
#include "config.h"
#include "parse.h"

struct ct_key {
	__be32 saddr; /* client */
	__be32 daddr; /* VIP */
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

enum ct_flag {
	CT_F_SEEN_REPLY = 1 << 0, /* a reply came back: established */
	CT_F_CLOSING = 1 << 1,    /* FIN or RST seen */
	CT_F_HAIRPIN = 1 << 2,    /* backend is the client itself: source masqueraded */
};

struct ct_value {
	__u64 expires_ns;     /* CLOCK_MONOTONIC (coarse) deadline; an expired entry is a new flow */
	__be32 backend_addr;
	__be16 backend_port;
	__u16 flags;          /* enum ct_flag */
	__u32 svc_id;         /* frontend id at creation, for ternctl */
	__u32 pad;
};

/* tern_ct: key ct_key (client's original tuple), value ct_value. LRU, size from the loader
 * (default 262144 flows): under pressure the least recently used flow is evicted and its
 * next packet starts a new flow. Per-CPU LRU lists (BPF_F_NO_COMMON_LRU): inserts take no
 * global lock, which measured ~20% cheaper per new flow here; the price is that eviction
 * picks from the inserting CPU's share of the map. Writer: from-pod creates and refreshes, to-pod marks
 * replies. Reader: both programs; ternctl dumps it. Pinned, so flows survive an agent
 * restart. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_ct SEC(".maps");

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

/* Fold the packet's TCP flags into the entry and push its deadline out. The deadline is
 * written only when it moves by more than a second, so established flows do not write to
 * shared memory on every packet. */
static __always_inline void ct_touch(struct ct_value *ct, __u64 now, __u8 proto, __u8 tcp_flags,
				     bool reply)
{
	__u16 flags = ct->flags;

	if (reply)
		flags |= CT_F_SEEN_REPLY;
	if (tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		flags |= CT_F_CLOSING;
	/* A new SYN on a closing tuple is the port being reused: start over. */
	if (!reply && (tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		flags &= ~(CT_F_CLOSING | CT_F_SEEN_REPLY);
	__u64 deadline = now + ct_lifetime_ns(proto, flags);
	if (flags != ct->flags) {
		ct->flags = flags;
		ct->expires_ns = deadline;
	} else if (deadline > ct->expires_ns + NSEC_PER_SEC) {
		ct->expires_ns = deadline;
	}
}

/* The coarse clock (tick resolution) is enough for lifetimes in seconds and far cheaper
 * than reading the clock source on every packet. One read per packet, passed around. */
static __always_inline __u64 ct_now(void)
{
	return bpf_ktime_get_coarse_ns();
}

static __always_inline struct ct_value *ct_lookup(const struct ct_key *k, __u64 now)
{
	struct ct_value *ct = bpf_map_lookup_elem(&tern_ct, k);

	if (ct && ct->expires_ns < now)
		return NULL;
	return ct;
}
