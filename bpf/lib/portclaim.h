/* Claiming a source port for a translated flow, shared by masquerade (snat.h: a pod's flow
 * leaving the VPC) and NodePort SNAT (nodeport.h: an external client's flow to a remote
 * backend). Both translate the source to one node address and need a port whose translated
 * wire tuple (address:port -> peer, protocol) no live flow holds; they differ only in the map
 * a claim is an entry of and in that entry's value.
 *
 * The candidates of a flow, in order: the flow's own source port, then CFG_SNAT_TRIES - 1
 * ports in [CFG_SNAT_PORT_MIN, +CFG_SNAT_PORT_COUNT) hashed from the flow's tuple and the try
 * number (random probing: expected tries 1/(1-occupancy), no clustering). The sequence is a
 * function of the flow alone, so a flow that lost its conntrack entry walks the same ports
 * again and finds its own claim. A claim is an insert with BPF_NOEXIST, so two CPUs never
 * take one port; an expired claim is free.
 *
 * No candidate lies in [CFG_SNAT_SKIP_MIN, +CFG_SNAT_SKIP_COUNT), the node's own ephemeral
 * ports (its ip_local_port_range, as far as it overlaps the range above; the own port too is
 * passed over there). The node's sockets share the translated address, and the maps only
 * know translated flows: a host connection picking a port a translated flow holds towards
 * the same peer would put two connections on one wire tuple, and the peer's answers to the
 * host would be turned back to the translated flow's client (or the other way round).
 * Keeping out of the range the kernel picks from makes that impossible for every connect()
 * that does not bind its port itself.
 *
 * One bpf_loop callback per user walks the candidates (its body is what differs):
 *
 *	struct ct_key k;
 *	__be16 port;
 *	if (!port_claim_key(&a->pc, i, ADDR, a->daddr, a->dport, &k, &port))
 *		return 1;                                  // tries exhausted
 *	struct my_value *old = bpf_map_lookup_elem(&my_map, &k);
 *	if (old && <old is this flow's own>)
 *		return port_claim_done(&a->pc, port);      // taken back
 *	return port_claim_insert(&a->pc, &my_map, &k, &a->v, old ? &old->expires_ns : NULL, port);
 */
#pragma once

#include "common.h"
#include "conntrack.h"
#include "metrics.h"

/* Ports (and ICMP identifiers) a translated flow gets when its own is taken, and how many
 * candidates one claim tries before it drops the packet (REASON_DROP_SNAT_NO_PORT).
 * Default 1024-65535: see docs/architecture.md, "Masquerade". */
volatile const __u16 CFG_SNAT_PORT_MIN = 1024;
volatile const __u16 CFG_SNAT_PORT_COUNT = 64512;
volatile const __u32 CFG_SNAT_TRIES = 32;
/* The node's ephemeral ports inside the range above (default: Linux's 32768-60999). The
 * loader keeps the window inside the range and leaves ports outside it. */
volatile const __u16 CFG_SNAT_SKIP_MIN = 32768;
volatile const __u16 CFG_SNAT_SKIP_COUNT = 28232;

#define SNAT_MAX_TRIES 256 /* the bpf_loop bound; the loader refuses a larger CFG_SNAT_TRIES */
#define SNAT_EEXIST 17     /* vmlinux.h has no errno macros */

static __always_inline __u32 snat_mix(__u32 x)
{
	x ^= x >> 16;
	x *= 0x7feb352d;
	x ^= x >> 15;
	x *= 0x846ca68b;
	x ^= x >> 16;
	return x;
}

/* A claim in progress: what every candidate needs, and the outcome. */
struct port_claim {
	/* in */
	__be16 first; /* the flow's own source port: the first candidate */
	__u8 proto;
	__u32 seed;   /* from the flow's tuple (port_claim_init) */
	__u64 now;
	/* out */
	__be16 port;  /* the claimed port */
	int result;   /* 0 claimed, else a drop reason */
	__u32 tries;  /* candidates looked at */
};

/* Start a claim for the flow p (its tuple as the client or pod sent it). */
static __always_inline void port_claim_init(struct port_claim *c, const struct pkt *p, __u64 now)
{
	c->first = p->sport;
	c->proto = p->proto;
	c->seed = snat_mix(p->saddr ^ snat_mix(p->daddr ^ snat_mix(((__u32)p->sport << 16 | p->dport) ^ p->proto)));
	c->now = now;
	c->port = 0;
	c->result = REASON_DROP_SNAT_NO_PORT;
	c->tries = 0;
}

/* Candidate i (0-based): its port and the key of its translated wire tuple addr:port ->
 * peer:peer_port. False once the tries are used up (c->result says so). */
static __always_inline bool port_claim_key(struct port_claim *c, __u32 i, __be32 addr, __be32 peer,
					   __be16 peer_port, struct ct_key *k, __be16 *port)
{
	bool from_a;

	if (i >= CFG_SNAT_TRIES) {
		c->result = REASON_DROP_SNAT_NO_PORT;
		return false;
	}
	*port = c->first;
	if (i > 0 || (__u32)bpf_ntohs(c->first) - CFG_SNAT_SKIP_MIN < CFG_SNAT_SKIP_COUNT) {
		/* A draw from the range without the window, then shifted past it. */
		__u32 n = CFG_SNAT_PORT_MIN + snat_mix(c->seed + i * 0x9e3779b9) %
						      ((__u32)CFG_SNAT_PORT_COUNT - CFG_SNAT_SKIP_COUNT);
		if (n >= CFG_SNAT_SKIP_MIN)
			n += CFG_SNAT_SKIP_COUNT;
		*port = bpf_htons(n);
	}
	c->tries = i + 1;
	ct_flow_key(k, addr, *port, peer, peer_port, c->proto, &from_a);
	return true;
}

/* The claim ends with port. Returns 1: the bpf_loop callback's "stop". */
static __always_inline long port_claim_done(struct port_claim *c, __be16 port)
{
	c->port = port;
	c->result = 0;
	return 1;
}

/* Claim candidate k (port) for value v in map, unless a live flow holds it. old_expires is
 * the deadline of the entry found there (NULL: none); an expired one is deleted first.
 * Returns the bpf_loop callback's answer: 0 next candidate, 1 stop (claimed, or the map is
 * full: c->result). */
static __always_inline long port_claim_insert(struct port_claim *c, void *map, const struct ct_key *k,
					      const void *v, const __u64 *old_expires, __be16 port)
{
	if (old_expires) {
		if (*old_expires >= c->now)
			return 0; /* a live flow's: next candidate */
		bpf_map_delete_elem(map, k);
	}
	long err = bpf_map_update_elem(map, k, v, BPF_NOEXIST);
	if (err == -SNAT_EEXIST) /* another CPU took it just now */
		return 0;
	if (err) {
		c->result = REASON_DROP_SNAT_FULL;
		return 1;
	}
	return port_claim_done(c, port);
}
