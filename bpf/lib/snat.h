/* Masquerade: source NAT of pod traffic leaving the VPC, on the node's network devices.
 *
 *   snat_egress   a local pod's packet to a destination outside the non-masquerade set:
 *                 its flow's translation (established), or a new one (port allocation)
 *   snat_ingress  a packet to the masquerade address: a reply restored to the pod, or an
 *                 ICMP error quoting a translated packet restored inside and out
 *
 * State, one conntrack entry and one NAT entry per flow:
 *   - the flow's conntrack entry (tern_conntrack, keyed by the pod's wire tuple, the one the
 *     pod program tracks) holds the translation: CT_F_SNAT, nat_addr = masquerade address,
 *     nat_sport = the port on the wire;
 *   - its NAT entry (tern_snat, keyed by the translated wire tuple) holds the pod's address
 *     and port, so a reply finds its flow with one exact lookup of what it carries.
 * Keeping them together: tern_snat is a plain hash, never evicted by the kernel; an entry
 * leaves only when its flow has expired by its conntrack state (the datapath takes an
 * expired entry as free, the agent's GC deletes it). So a reply can always be restored while
 * its flow lives. The conntrack entry is in the shared LRU and may be evicted under
 * pressure, but it is the half that can be rebuilt: the egress path looks for the flow's NAT
 * entry along the same per-flow candidate sequence it allocated from (original port first,
 * then a sequence seeded by the pod's tuple), and a candidate that holds this very pod tuple
 * is the flow's own translation, taken back. An active flow keeps its conntrack entry warm
 * on every packet both ways (the pod program touches it), so the LRU takes idle flows first.
 *
 * Port allocation: the pod's own port when the translated tuple is free, else up to
 * CFG_SNAT_TRIES candidates in [CFG_SNAT_PORT_MIN, +CFG_SNAT_PORT_COUNT) chosen by hashing
 * the pod's tuple with the try number (random probing: expected tries 1/(1-occupancy), with
 * no clustering). A claim is an insert with BPF_NOEXIST, so two CPUs never take one port.
 * Ports are per destination (address, port, protocol): the range only runs out for many flows
 * to one remote endpoint. ICMP echo uses its identifier as the port. */
#pragma once

#include "common.h"
#include "conntrack.h"
#include "endpoint.h"
#include "metrics.h"
#include "nat.h"
#include "parse.h"
#include "portclaim.h"

/* The node address pod traffic is masqueraded to (network order); 0 turns masquerade off.
 * CFG_MASQ_IFINDEX is the interface that address lives on (the primary NIC): a packet
 * masqueraded on another link (an ENI, whose source checks would refuse the node's address)
 * is redirected out of it. 0: leave every packet on its link. */
volatile const __be32 CFG_MASQ_ADDR = 0;
volatile const __u32 CFG_MASQ_IFINDEX = 0;

/* The port range (CFG_SNAT_PORT_MIN/COUNT) and tries (CFG_SNAT_TRIES) are portclaim.h's. */

struct snat_value {
	__u64 expires_ns; /* the flow's deadline by its conntrack state; expired = free */
	__be32 orig_addr; /* the pod's address */
	__be16 orig_port; /* the pod's port (ICMP echo: its identifier) */
	__u16 flags;      /* CT_F_SEEN_REPLY, CT_F_CLOSING: the state its lifetime follows */
};

/* tern_snat: key ct_key (the translated wire tuple: masquerade address and port, remote
 * address and port, protocol; canonical order), value snat_value (the pod's address and
 * port). One entry per masqueraded flow. A plain preallocated hash, so the kernel never
 * evicts a live flow's NAT entry (see the header comment); size from the loader (default
 * 131072; a full map drops new flows with REASON_DROP_SNAT_FULL). Expired entries are free
 * to the datapath and deleted by the agent's GC. Writers: to-netdev (claim, refresh),
 * from-netdev (reply state), agent GC (delete). Readers: both netdev programs, agent, ternctl. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct ct_key);
	__type(value, struct snat_value);
	__uint(max_entries, 131072);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_snat SEC(".maps");

struct nonmasq_key {
	__u32 prefixlen;
	__be32 addr;
};

/* tern_nonmasq: key nonmasq_key (a CIDR), value __u8 (unused, 1). The destinations pod
 * traffic keeps its own address to: the VPC CIDRs, the service CIDR, configured extra CIDRs
 * (ip-masq-agent's nonMasqueradeCIDRs) and link-local. LPM trie, 1024 prefixes; never
 * evicted. Writer: agent (masquerade reconciler, at start and on config change). Reader:
 * to-netdev. An empty map with masquerade on masquerades everything off the node. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct nonmasq_key);
	__type(value, __u8);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_nonmasq SEC(".maps");

struct snat_stats {
	__u64 allocations; /* new translations claimed */
	__u64 tries;       /* candidates looked at by those allocations and the failed ones */
	__u64 failures;    /* allocations that found no free port in CFG_SNAT_TRIES */
};

/* tern_snat_stats: key 0, value snat_stats per CPU. An array of one: never evicted.
 * Writer: to-netdev on every allocation. Reader: agent (/metrics: tries per allocation
 * shows how full the port space is), the allocation benchmark. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct snat_stats);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_snat_stats SEC(".maps");

/* Outcomes of the stages, besides a drop reason (enum tern_reason, > 0). */
#define SNAT_PASS 0      /* not masquerade traffic: untouched */
#define SNAT_DONE (-1)   /* translated */

/* Whether a packet on its way out is a local pod's to a destination outside the
 * non-masquerade set. */
static __always_inline bool snat_wanted(const struct pkt *p)
{
	if (!CFG_MASQ_ADDR || p->saddr == CFG_MASQ_ADDR)
		return false;
	struct ipcache_value *src = ipcache_lookup(p->saddr);
	if (!src || !(src->flags & IPC_F_LOCAL))
		return false;
	struct nonmasq_key k = { .prefixlen = 32, .addr = p->daddr };
	return bpf_map_lookup_elem(&tern_nonmasq, &k) == NULL;
}

/* The ICMP header fields masquerade reads: type and, for echo, the identifier. */
static __always_inline bool snat_icmp_hdr(struct __sk_buff *skb, const struct pkt *p, __u8 *type,
					  __be16 *id)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	__u32 off = p->l4_off & 0x7f;
	__u8 *icmp = data + off;

	if ((void *)(ip + 1) > data_end || (void *)(icmp + 8) > data_end)
		return false;
	if (!ip_holds(ip, off, 8))
		return false;
	*type = icmp[0];
	*id = *(__be16 *)(icmp + 4);
	return true;
}

/* Refresh a NAT entry's state and deadline from a packet of its flow. */
static __always_inline void snat_touch(struct snat_value *v, __u64 now, __u8 proto, __u8 tcp_flags,
				       bool reply)
{
	struct ct_value c = { .expires_ns = v->expires_ns, .flags = v->flags };

	if (ct_touch(&c, now, proto, tcp_flags, reply)) {
		v->flags = c.flags;
		v->expires_ns = c.expires_ns;
	}
}

struct snat_alloc {
	__be32 daddr;
	__be16 dport;
	struct snat_value v; /* the claim's value */
	struct port_claim pc;
};

/* One candidate: claim it if free (or expired), take it back if it is this flow's own. */
static long snat_try(__u32 i, struct snat_alloc *a)
{
	struct ct_key k;
	__be16 port;

	if (!port_claim_key(&a->pc, i, CFG_MASQ_ADDR, a->daddr, a->dport, &k, &port))
		return 1;
	struct snat_value *old = bpf_map_lookup_elem(&tern_snat, &k);
	if (old && old->orig_addr == a->v.orig_addr && old->orig_port == a->v.orig_port) {
		/* This flow's own translation: its conntrack entry was lost, the NAT one not. */
		if (old->expires_ns < a->pc.now)
			*old = a->v;
		return port_claim_done(&a->pc, port);
	}
	return port_claim_insert(&a->pc, &tern_snat, &k, &a->v, old ? &old->expires_ns : NULL, port);
}

static __always_inline void snat_count_alloc(const struct snat_alloc *a)
{
	__u32 zero = 0;
	struct snat_stats *s = bpf_map_lookup_elem(&tern_snat_stats, &zero);

	if (!s)
		return;
	s->tries += a->pc.tries;
	if (a->pc.result == 0)
		s->allocations++;
	else if (a->pc.result == REASON_DROP_SNAT_NO_PORT)
		s->failures++;
}

/* A translation for a flow whose conntrack entry has none: returns 0 with the port in *port,
 * or a drop reason. */
static __always_inline int snat_allocate(const struct pkt *p, __u64 now, __be16 *port)
{
	struct snat_alloc a = {
		.daddr = p->daddr,
		.dport = p->dport,
	};

	port_claim_init(&a.pc, p, now);
	a.v.orig_addr = p->saddr;
	a.v.orig_port = p->sport;
	if (p->proto == IPPROTO_TCP && !(p->tcp_flags & TCP_FLAG_SYN))
		a.v.flags = CT_F_SEEN_REPLY; /* a flow older than its state (see flow_track) */
	a.v.expires_ns = now + ct_lifetime_ns(p->proto, a.v.flags);
	bpf_loop(SNAT_MAX_TRIES, snat_try, &a, 0);
	snat_count_alloc(&a);
	*port = a.pc.port;
	return a.pc.result;
}

/* The flow's conntrack entry, created if the pod program did not (ICMP, which it does not
 * track). */
static __always_inline struct ct_value *snat_flow(const struct pkt *p, __u64 now, struct ct_key *k)
{
	bool from_a;

	ct_flow_key(k, p->saddr, p->sport, p->daddr, p->dport, p->proto, &from_a);
	struct ct_value *ct = ct_lookup(k, now);
	if (ct)
		return ct;
	struct ct_value v = { .flags = from_a ? 0 : CT_F_ORIGIN_B };
	if (p->proto == IPPROTO_TCP && !(p->tcp_flags & TCP_FLAG_SYN))
		v.flags |= CT_F_SEEN_REPLY;
	v.expires_ns = now + ct_lifetime_ns(p->proto, v.flags);
	if (bpf_map_update_elem(&tern_conntrack, k, &v, BPF_ANY))
		return NULL;
	return bpf_map_lookup_elem(&tern_conntrack, k);
}

/* The NAT entry of an established flow, refreshed; NULL when it is gone or no longer this
 * flow's (expired and taken), so the caller allocates again. */
static __always_inline bool snat_refresh(const struct pkt *p, const struct ct_value *ct, __u64 now)
{
	struct ct_key k;
	bool from_a;

	ct_flow_key(&k, CFG_MASQ_ADDR, ct->nat_sport, p->daddr, p->dport, p->proto, &from_a);
	struct snat_value *v = bpf_map_lookup_elem(&tern_snat, &k);
	if (!v || v->expires_ns < now || v->orig_addr != p->saddr || v->orig_port != p->sport)
		return false;
	snat_touch(v, now, p->proto, p->tcp_flags, false);
	return true;
}

/* Rewrite an ICMP echo's identifier and the ICMP checksum (no pseudo header). */
static __always_inline int snat_icmp_id(struct __sk_buff *skb, const struct pkt *p, __be16 from, __be16 to)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 *icmp = data + (p->l4_off & 0x7f);

	if ((void *)(icmp + 8) > data_end)
		return -1;
	if (from == to)
		return 0;
	__be16 *check = (__be16 *)(icmp + 2);
	*check = csum_replace4(*check, from, to);
	*(__be16 *)(icmp + 4) = to;
	return 0;
}

static __always_inline int snat_egress(struct __sk_buff *skb, struct pkt *p, __u64 now)
{
	if (!snat_wanted(p))
		return SNAT_PASS;
	if (!p->first_frag) {
		/* A later fragment carries no ports: the address alone, as its head got. */
		return nat_rewrite(skb, p, false, CFG_MASQ_ADDR, 0) ? REASON_DROP_NAT_FAILED : SNAT_DONE;
	}
	if (p->proto == IPPROTO_ICMP) {
		__u8 type;
		__be16 id;
		if (!snat_icmp_hdr(skb, p, &type, &id) || type != ICMP_ECHO)
			return SNAT_PASS; /* only echo opens a masqueraded ICMP flow */
		p->sport = id;
		p->dport = 0;
	} else if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP) {
		return SNAT_PASS;
	}

	struct ct_key ck;
	struct ct_value *ct = snat_flow(p, now, &ck);
	if (!ct)
		return REASON_DROP_CT_FULL;
	/* A service flow's translated tuple (a backend outside the VPC) is left as it is. */
	if (ct->flags & (CT_F_SVC | CT_F_REVNAT | CT_F_HAIRPIN))
		return SNAT_PASS;
	/* The pod program refreshes TCP and UDP entries; ICMP ones only live by this. */
	if (p->proto == IPPROTO_ICMP)
		ct_touch(ct, now, p->proto, 0, false);
	__be16 port = ct->nat_sport;
	if (!(ct->flags & CT_F_SNAT) || ct->nat_addr != CFG_MASQ_ADDR || !snat_refresh(p, ct, now)) {
		int reason = snat_allocate(p, now, &port);
		if (reason)
			return reason;
		ct->nat_addr = CFG_MASQ_ADDR;
		ct->nat_sport = port;
		ct->flags |= CT_F_SNAT;
	}
	if (p->proto == IPPROTO_ICMP) {
		if (snat_icmp_id(skb, p, p->sport, port))
			return REASON_DROP_NAT_FAILED;
		port = 0;
	}
	if (nat_rewrite(skb, p, false, CFG_MASQ_ADDR, port))
		return REASON_DROP_NAT_FAILED;
	return SNAT_DONE;
}

/* An ICMP error about a translated packet: the quoted header (inner source = masquerade
 * address and port) goes back to the pod's, and so does the outer destination. The quoted
 * L4 checksum is left alone: an error quotes only 8 bytes of it and nobody checks it. */
static __always_inline int snat_icmp_error(struct __sk_buff *skb, struct pkt *p, __u64 now)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 off = p->l4_off & 0x7f;
	__u8 *icmp = data + off;
	struct iphdr *ip = data + ETH_HLEN;
	struct iphdr *in = data + off + 8;

	if ((void *)(in + 1) > data_end || in->ihl != 5 || in->saddr != CFG_MASQ_ADDR)
		return SNAT_PASS;
	__be16 *inports = (__be16 *)(in + 1);
	if ((void *)(ip + 1) > data_end || (void *)(inports + 4) > data_end)
		return SNAT_PASS;
	if (!ip_holds(ip, off, 8 + 20 + 8))
		return SNAT_PASS;

	__u8 proto = in->protocol;
	__be16 sport, dport;
	__be16 *port_field; /* the quoted field holding the masquerade port */
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		sport = inports[0];
		dport = inports[1];
		port_field = &inports[0];
	} else if (proto == IPPROTO_ICMP && *(__u8 *)inports == ICMP_ECHO) {
		sport = inports[2];
		dport = 0;
		port_field = &inports[2];
	} else {
		return SNAT_PASS;
	}
	struct ct_key k;
	bool from_a;
	ct_flow_key(&k, in->saddr, sport, in->daddr, dport, proto, &from_a);
	struct snat_value *v = bpf_map_lookup_elem(&tern_snat, &k);
	if (!v || v->expires_ns < now)
		return SNAT_PASS;

	__be32 pod = v->orig_addr;
	__be16 pod_port = v->orig_port;
	__be16 *icmp_check = (__be16 *)(icmp + 2);
	__u16 check = *icmp_check;
	__be16 old_in_check = in->check;
	__be16 new_in_check = csum_replace4(old_in_check, in->saddr, pod);

	check = csum_replace4(check, in->saddr, pod);
	check = csum_replace4(check, old_in_check, new_in_check);
	check = csum_replace4(check, *port_field, pod_port);
	in->saddr = pod;
	in->check = new_in_check;
	*port_field = pod_port;
	*icmp_check = check;
	/* Outer header: to the pod (ICMP has no pseudo header; only the IPv4 sum moves). */
	if (nat_rewrite(skb, p, true, pod, 0))
		return REASON_DROP_NAT_FAILED;
	return SNAT_DONE;
}

static __always_inline int snat_ingress(struct __sk_buff *skb, struct pkt *p, __u64 now)
{
	if (!CFG_MASQ_ADDR || p->daddr != CFG_MASQ_ADDR || !p->first_frag)
		return SNAT_PASS;
	if (p->proto == IPPROTO_ICMP) {
		__u8 type;
		__be16 id;
		if (!snat_icmp_hdr(skb, p, &type, &id))
			return SNAT_PASS;
		if (type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB)
			return snat_icmp_error(skb, p, now);
		if (type != ICMP_ECHOREPLY)
			return SNAT_PASS;
		p->sport = 0;
		p->dport = id;
	} else if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP) {
		return SNAT_PASS;
	}

	struct ct_key k;
	bool from_a;
	ct_flow_key(&k, p->saddr, p->sport, p->daddr, p->dport, p->proto, &from_a);
	struct snat_value *v = bpf_map_lookup_elem(&tern_snat, &k);
	if (!v || v->expires_ns < now)
		return SNAT_PASS; /* the node's own traffic, or a flow long gone */
	snat_touch(v, now, p->proto, p->tcp_flags, true);
	__be32 pod = v->orig_addr;
	__be16 pod_port = v->orig_port;
	if (p->proto == IPPROTO_ICMP) {
		if (snat_icmp_id(skb, p, p->dport, pod_port))
			return REASON_DROP_NAT_FAILED;
		pod_port = 0;
	}
	if (nat_rewrite(skb, p, true, pod, pod_port))
		return REASON_DROP_NAT_FAILED;
	return SNAT_DONE;
}
