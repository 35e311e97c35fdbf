/* The bandwidth manager: per-pod rate limits from the kubernetes.io/egress-bandwidth and
 * kubernetes.io/ingress-bandwidth annotations.
 *
 * Both modes keep one number per pod and direction, the time at which the pod's line is
 * next free ("next"): a packet of len bytes occupies it for len / rate seconds.
 *
 *   EDT (egress, where the kernel has the fq qdisc): the packet may leave at
 *   max(next, now); that departure time goes into skb->tstamp as a monotonic delivery time,
 *   which survives forwarding, and fq on the device the packet leaves by (the ENI or the
 *   primary NIC) holds it until then. Nothing is dropped unless the queue would reach
 *   beyond the horizon. TCP's small-queue accounting then slows the sender instead of
 *   losing its segments.
 *
 *   Policer (ingress always; egress where fq is missing): a token bucket written as GCRA.
 *   A packet passes if, after it, the line is busy no further ahead than the burst allows
 *   (burst_ns = burst bytes / rate); otherwise it is dropped and the state is untouched.
 *
 * The read-modify-write of "next" is not atomic: two CPUs sending for one pod at the same
 * instant may both pass on the same slot. That lets at most one extra packet per CPU
 * through now and then; the rate over any longer interval holds. A lock per packet would
 * cost more than it is worth. */
#pragma once

#include "common.h"
#include "metrics.h"

/* Load-time: 1 when the node shapes pod egress by EDT (fq present), 0 for the policer.
 * The agent probes the kernel before loading (bandwidth.ProbeFQ). */
volatile const __u8 CFG_BW_EDT = 0;

struct bw_key {
	__u32 ifindex; /* the pod's host-side veth, as the pod programs see it in skb->ifindex */
};

/* One direction's limit and state. rate and burst_ns are written by the agent; next only
 * by the programs (an agent write of a changed limit resets it to 0, a full bucket). */
struct bw_dir {
	__u64 rate;     /* bytes per second; 0: no limit in this direction */
	__u64 burst_ns; /* how far ahead of now the line may be booked: the policer's bucket
			 * (burst / rate), or EDT's horizon, beyond which a packet is dropped */
	__u64 next;     /* monotonic ns when the line is next free */
};

struct bw_value {
	struct bw_dir egress;  /* what the pod sends (tern_from_pod) */
	struct bw_dir ingress; /* what the pod receives (tern_to_pod) */
};

/* tern_bandwidth: key bw_key (host veth ifindex), value bw_value. One entry per pod that has
 * a bandwidth annotation; 4096 like tern_endpoints; never evicted (a hash, the agent
 * deletes an entry when the pod's annotations go or its veth is detached). Writer: the
 * agent's bandwidth reconciler (bandwidth/), limits only; the pod programs write the
 * "next" fields. Readers: pod programs (one lookup per packet by skb->ifindex), ternctl. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct bw_key);
	__type(value, struct bw_value);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_bandwidth SEC(".maps");

/* Whether the pod behind host veth ifindex has a limit in the direction (egress: what it
 * sends). The forward stage asks it: a redirect into a pod skips its to-pod hook, where its
 * ingress limit is enforced. */
static __always_inline bool bw_limited(__u32 ifindex, bool egress)
{
	struct bw_key k = { .ifindex = ifindex };
	struct bw_value *v = bpf_map_lookup_elem(&tern_bandwidth, &k);

	return v && (egress ? v->egress.rate : v->ingress.rate);
}

/* How long len bytes occupy a line of rate bytes per second, in ns. rate is at least 1
 * (checked by the caller); len * 1e9 fits 64 bits for any skb. */
static __always_inline __u64 bw_cost_ns(__u32 len, __u64 rate)
{
	return (__u64)len * NSEC_PER_SEC / rate;
}

/* The policer: TC_ACT_OK, or TC_ACT_SHOT counted as REASON_DROP_BW_POLICED. */
static __always_inline int bw_police(struct __sk_buff *skb, struct bw_dir *d, __u64 now, __u8 dir)
{
	__u64 start = d->next > now ? d->next : now;
	__u64 end = start + bw_cost_ns(skb->len, d->rate);

	if (end - now > d->burst_ns)
		return drop(skb, REASON_DROP_BW_POLICED, dir);
	d->next = end;
	return TC_ACT_OK;
}

/* EDT: stamp the departure time, or drop past the horizon (REASON_DROP_BW_HORIZON): the pod
 * sends far above its rate and more is queued than its sockets' small-queue limit explains. */
static __always_inline int bw_pace(struct __sk_buff *skb, struct bw_dir *d, __u64 now, __u8 dir)
{
	__u64 depart = d->next > now ? d->next : now;

	if (depart - now > d->burst_ns)
		return drop(skb, REASON_DROP_BW_HORIZON, dir);
	d->next = depart + bw_cost_ns(skb->len, d->rate);
	/* Only a later time than now needs a stamp; the sender's own (TCP pacing) stays
	 * otherwise. A monotonic delivery time is kept by forwarding, a plain one is not. */
	if (depart > now) {
		if (bpf_skb_set_tstamp(skb, depart, BPF_SKB_TSTAMP_DELIVERY_MONO))
			return drop(skb, REASON_DROP_BW_HORIZON, dir);
		count(skb, REASON_BW_PACED, dir);
	}
	return TC_ACT_OK;
}

static __always_inline struct bw_value *bw_lookup(const struct __sk_buff *skb)
{
	struct bw_key k = { .ifindex = skb->ifindex };

	return bpf_map_lookup_elem(&tern_bandwidth, &k);
}

/* What the pod sends (tern_from_pod, tc ingress on the host veth): paced (EDT) or policed. */
static __always_inline int bw_egress(struct __sk_buff *skb)
{
	struct bw_value *v = bw_lookup(skb);

	if (!v || !v->egress.rate)
		return TC_ACT_OK;
	if (CFG_BW_EDT)
		return bw_pace(skb, &v->egress, bpf_ktime_get_ns(), DIR_FROM_POD);
	return bw_police(skb, &v->egress, bpf_ktime_get_ns(), DIR_FROM_POD);
}

/* What the pod receives (tern_to_pod, tc egress on the host veth): policed. A veth has no
 * fq, and the packet has already crossed the node's link, so there is nothing to pace. */
static __always_inline int bw_ingress(struct __sk_buff *skb)
{
	struct bw_value *v = bw_lookup(skb);

	if (!v || !v->ingress.rate)
		return TC_ACT_OK;
	return bw_police(skb, &v->ingress, bpf_ktime_get_ns(), DIR_TO_POD);
}
