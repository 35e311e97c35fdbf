/* NetworkPolicy: the policy stage of the pod programs.
 *
 * Each pod program calls it once per packet, before conntrack records the packet:
 *   tern_from_pod -> policy_from_pod: the pod sends. A packet that opens or continues a
 *       flow the pod opened is judged by the pod's egress policy against its destination
 *       (for a service flow, the backend chosen by translation); a reply on a flow the pod
 *       accepted is judged by its ingress policy.
 *   tern_to_pod   -> policy_to_pod: the pod receives; the mirror image.
 *
 * A verdict is looked up once per flow and direction: an allowed one is cached in the
 * conntrack entry (ct_value.policy: CT_POL_OUT for the opener's egress, CT_POL_IN for the
 * responder's ingress), so established packets and replies of allowed flows pay no policy
 * lookup. A denied packet creates no conntrack entry. A pure SYN is judged again even on a
 * cached entry: it starts a new connection on a reused tuple.
 *
 * The lookup for (subject = the pod's identity, peer address, direction, proto, port):
 *   1. always allowed: the peer is the pod itself, or the local node (tern_policy_cidrs says
 *      IDENTITY_HOST, or the packet comes from the host stack: ingress_ifindex 0);
 *   2. not isolated in that direction (tern_policy_isolation) -> allowed;
 *   3. tern_policy, an LPM trie, with the peer's pod identity (tern_ipcache), then the
 *      identity of the longest ipBlock prefix holding the peer (tern_policy_cidrs), then
 *      "any peer" (0). Each lookup is one trie walk whose prefix covers exact ports, port
 *      ranges (aligned blocks, at most 30 per range) and "any port / any protocol", so a
 *      packet costs at most three LPM lookups whatever the number of rules. Policies only
 *      allow, so any covering entry is an allow.
 * Why LPM and not a hash with a wildcard order: endPort ranges would have to be expanded
 * port by port (a 1-65535 range is 65535 entries per peer) or probed block by block.
 *
 * Audit (POL_ISO_AUDIT on the subject): a would-drop is counted (REASON_POLICY_AUDIT) and
 * passed, and not cached, so every such packet is counted.
 *
 * Not judged here: packets the pipeline does not track (ICMP and other protocols without
 * ports, a non-first fragment whose head was not seen: it cannot be reassembled without the
 * head, which was judged). */
#pragma once

#include "common.h"
#include "metrics.h"
#include "parse.h"
#include "conntrack.h"
#include "endpoint.h"
#include "svc.h"

enum policy_dir {
	POLICY_INGRESS = 1,
	POLICY_EGRESS = 2,
};

/* Reserved identities (policy/identity.go). */
#define IDENTITY_ANY 0  /* in a key: any peer; as an address's identity: unknown */
#define IDENTITY_HOST 1 /* the local node */

/* LPM: the high prefixlen bits of (subject, peer, dir, proto, port) must match. 96 is one
 * port, 80 + n a block of ports with n fixed bits, 80 any port of proto, 72 any protocol.
 * Multi-byte fields are big-endian: the trie compares bytes in order. */
struct policy_key {
	__u32 prefixlen;
	__be32 subject; /* identity of the local pod the rule protects */
	__be32 peer;    /* identity of the other end; 0 any */
	__u8 dir;       /* enum policy_dir */
	__u8 proto;     /* IPPROTO_*; 0 any (with prefixlen 72) */
	__be16 port;    /* the destination port: the subject's for ingress, the peer's for egress */
};

struct policy_value {
	__u32 policy; /* index of the first policy that allows it (ternctl, events) */
};

#define POLICY_KEY_BITS 96

/* tern_policy: key policy_key, value policy_value. LPM trie, 262144 entries (16-byte key:
 * about 80 bytes a node, ~20 MiB if full; allocated as used); never evicted. Holds only
 * the rules whose subject is an identity with a pod on this node. Writer: agent policy
 * reconciler (agent/policy.go), from the compiler (policy/). Readers: pod programs on a new
 * flow, ternctl. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_policy SEC(".maps");

enum policy_iso_flag {
	POL_ISO_INGRESS = 1 << 0, /* some policy with Ingress selects the identity */
	POL_ISO_EGRESS = 1 << 1,  /* some policy with Egress selects the identity */
	POL_ISO_AUDIT = 1 << 2,   /* report would-drops, do not enforce */
};

struct policy_iso_value {
	__u32 flags; /* enum policy_iso_flag */
};

/* tern_policy_isolation: key __u32 identity (host order), value policy_iso_value. Hash,
 * 65536 entries (8 bytes each); never evicted. One entry per isolated identity with a pod
 * on this node; none means not isolated. Writer: agent policy reconciler. Readers: pod
 * programs on a new flow, ternctl. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct policy_iso_value);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_policy_isolation SEC(".maps");

struct policy_cidr_key {
	__u32 prefixlen;
	__be32 addr;
};

struct policy_cidr_value {
	__u32 identity; /* of the prefix (high bit set), or IDENTITY_HOST */
};

/* tern_policy_cidrs: key policy_cidr_key, value policy_cidr_value. LPM trie, 16384
 * prefixes; never evicted. Every ipBlock cidr and except of the cluster's policies, and the
 * local node's addresses as IDENTITY_HOST. Kept apart from tern_ipcache because an ipBlock
 * also matches pod addresses, whose /32 there carries the pod's identity: a peer has both
 * identities and both are looked up. Writer: agent policy reconciler. Readers: pod programs
 * on a new flow, ternctl. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_cidr_key);
	__type(value, struct policy_cidr_value);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_policy_cidrs SEC(".maps");

static __always_inline bool policy_match(__u32 subject, __u32 peer, __u8 dir, __u8 proto, __be16 port)
{
	struct policy_key k = {
		.prefixlen = POLICY_KEY_BITS,
		.subject = bpf_htonl(subject),
		.peer = bpf_htonl(peer),
		.dir = dir,
		.proto = proto,
		.port = port,
	};

	return bpf_map_lookup_elem(&tern_policy, &k) != NULL;
}

/* Whether the subject endpoint's policies allow peer on (proto, port) in dir. *audit is set
 * when a denial should only be reported. */
static __always_inline bool policy_allows(const struct endpoint_value *ep, __u8 dir, __be32 peer,
					  __u8 proto, __be16 port, bool *audit)
{
	__u32 subject = ep->identity;
	struct policy_iso_value *iso = bpf_map_lookup_elem(&tern_policy_isolation, &subject);

	if (!iso)
		return true;
	if (!(iso->flags & (dir == POLICY_INGRESS ? POL_ISO_INGRESS : POL_ISO_EGRESS)))
		return true;
	*audit = !!(iso->flags & POL_ISO_AUDIT);
	if (peer == ep->addr)
		return true; /* a pod cannot block access to itself */

	struct policy_cidr_key ck = { .prefixlen = 32, .addr = peer };
	struct policy_cidr_value *cv = bpf_map_lookup_elem(&tern_policy_cidrs, &ck);
	__u32 cidr = cv ? cv->identity : IDENTITY_ANY;

	if (cidr == IDENTITY_HOST)
		return true;
	struct ipcache_value *ipc = ipcache_lookup(peer);
	if (ipc && ipc->identity != IDENTITY_ANY && policy_match(subject, ipc->identity, dir, proto, port))
		return true;
	if (cidr != IDENTITY_ANY && policy_match(subject, cidr, dir, proto, port))
		return true;
	return policy_match(subject, IDENTITY_ANY, dir, proto, port);
}

/* Judge a packet of endpoint ep in dir against peer:port, unless ct caches the verdict
 * (flag). Returns 0 to go on or a drop reason. */
static __always_inline int policy_judge(struct __sk_buff *skb, const struct pkt *p, struct ct_value *ct,
					const struct endpoint_value *ep, __u8 dir, __u16 flag,
					__be32 peer, __be16 port, __u8 count_dir)
{
	bool audit = false;

	if (ct && (ct->policy & flag) && !is_pure_syn(p->tcp_flags))
		return 0;
	if (policy_allows(ep, dir, peer, p->proto, port, &audit)) {
		/* Racy with the other half of a same-node flow setting its bit: a lost bit only
		 * costs one more lookup. A new flow's entry is cached on its next packet. */
		if (ct)
			ct->policy |= flag;
		return 0;
	}
	if (audit) {
		count(skb, REASON_POLICY_AUDIT, count_dir);
		return 0;
	}
	return REASON_DROP_POLICY;
}

/* The pod sends p on flow f, to daddr:dport as it leaves (after service translation). */
static __always_inline int policy_from_pod(struct __sk_buff *skb, const struct pkt *p, const struct flow *f,
					   __be32 daddr, __be16 dport)
{
	struct endpoint_value *ep = endpoint_of(skb);

	if (!ep || !(ep->flags & EP_F_POLICY))
		return 0;
	if (f->ct && ct_is_reply(f->ct, f->from_a))
		return policy_judge(skb, p, f->ct, ep, POLICY_INGRESS, CT_POL_IN, daddr, p->sport, DIR_FROM_POD);
	return policy_judge(skb, p, f->ct, ep, POLICY_EGRESS, CT_POL_OUT, daddr, dport, DIR_FROM_POD);
}

/* The pod receives p on flow f. */
static __always_inline int policy_to_pod(struct __sk_buff *skb, const struct pkt *p, const struct flow *f)
{
	struct endpoint_value *ep = endpoint_of(skb);

	if (!ep || !(ep->flags & EP_F_POLICY))
		return 0;
	/* From the node's own stack (kubelet probes, host-network pods): always allowed. */
	if (skb->ingress_ifindex == 0)
		return 0;
	if (f->ct && ct_is_reply(f->ct, f->from_a))
		return policy_judge(skb, p, f->ct, ep, POLICY_EGRESS, CT_POL_OUT, p->saddr, p->sport, DIR_TO_POD);
	return policy_judge(skb, p, f->ct, ep, POLICY_INGRESS, CT_POL_IN, p->saddr, p->dport, DIR_TO_POD);
}
