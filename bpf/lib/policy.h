/* NetworkPolicy: the policy stage of the pod programs.
 *
 * Each pod program calls it once per packet, before conntrack records the packet:
 *   tern_from_pod -> policy_from_pod: the pod sends. A packet that opens or continues a
 *       flow the pod opened is judged by the pod's egress policy against its destination
 *       (for a service flow, the backend chosen by translation); a reply on a flow the pod
 *       accepted is judged by its ingress policy.
 *   tern_to_pod   -> policy_to_pod: the pod receives; the mirror image.
 * And once per new flow to a local exclusive-ENI backend, which its veth will see coming from
 * the node (always allowed): policy_local_backend_ingress judges the backend's ingress
 * against the real client where the flow is opened (tern_from_pod for a client pod,
 * tern_from_netdev for an external client), before the translation to the node's address.
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
 * Which policy decided (visibility). Every tern_policy value names a policy slot: a small
 * number the agent gives each NetworkPolicy for as long as it exists (tern_policy_names
 * holds the slot's "namespace/name", so ternctl can name it with the agent down). An allow
 * is decided by the slot of the entry that matched; a deny by the policy that isolates the
 * subject in that direction (the first by namespace/name if several do), which the trie
 * holds as an "isolator" entry: dir | POLICY_DIR_ISOLATOR, any peer, any protocol. That
 * entry can never match an allow lookup (dir 1 or 2), and is looked up on denials only.
 * Each judged packet adds to tern_policy_stats[slot, dir, verdict] (a per-CPU array: one
 * inlined lookup, no atomics) and, for denials and audit would-drops always and for allows
 * if CFG_POLICY_EVENTS_ALLOWED, sends a policy_event on tern_events (rate limited with the
 * drops). Why this costs little: only a packet that is judged pays it, that is the first
 * packet of each flow and direction (the verdict is then cached in conntrack, also when the
 * first packet creates the entry) and every denied packet; an established flow pays
 * nothing more than before. So the allow counters count new flows (their first packet and
 * its bytes), the deny counters every dropped packet.
 *
 * ICMP (no ports, not tracked): an echo request or any other query type is judged as a new
 * flow with protocol ICMP and port 0, which only an entry for any protocol matches, i.e. a
 * rule whose peer is listed without ports (Cilium's choice: ICMP passes L3-only rules);
 * replies and errors (echo reply, destination unreachable, time exceeded, parameter
 * problem) pass unjudged, as replies of flows would. Stateless: an unsolicited echo reply
 * or error is not refused.
 *
 * Not judged here: other protocols without ports, a non-first fragment whose head was not
 * seen (it cannot be reassembled without the head, which was judged). */
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

/* Or'ed into policy_key.dir: the entry names the policy isolating the subject (see above). */
#define POLICY_DIR_ISOLATOR 0x80

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
	__u32 policy; /* slot of the policy that allows it (isolator entry: that isolates), 0 unknown */
};

#define POLICY_KEY_BITS 96

/* tern_policy: key policy_key, value policy_value. LPM trie, 262144 entries (16-byte key:
 * about 80 bytes a node, ~20 MiB if full; allocated as used); never evicted. Holds only
 * the rules whose subject is an identity with a pod on this node. Writer: agent policy
 * reconciler (agent/policy.go), from the compiler (policy/). Readers: pod programs on a new
 * flow, tern_from_netdev on a new flow to a local exclusive-ENI backend, ternctl. */
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
 * programs on a new flow, tern_from_netdev (a local exclusive-ENI backend), ternctl. */
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
 * on a new flow, tern_from_netdev (a local exclusive-ENI backend), ternctl. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_cidr_key);
	__type(value, struct policy_cidr_value);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_policy_cidrs SEC(".maps");

/* Whether allowed verdicts are sent on tern_events too (denials always are). Set by the
 * loader from the agent's networkPolicy.allowedEvents; off by default: one event per new
 * allowed flow is a lot on a busy node. */
volatile const __u8 CFG_POLICY_EVENTS_ALLOWED = 0;

/* Policy slots: 0 is "unknown" (a slot the agent could not give: more policies than
 * slots); 1..POLICY_SLOTS-1 name a NetworkPolicy in tern_policy_names. */
#define POLICY_SLOTS 4096

enum policy_verdict {
	POLICY_ALLOWED = 0,
	POLICY_DENIED = 1,
};

/* The meaning of tern_policy_stats' index: slot << 2 | (dir - 1) << 1 | verdict. */
struct policy_stats_key {
	__u32 slot;
	__u8 dir;     /* enum policy_dir */
	__u8 verdict; /* enum policy_verdict */
	__u16 pad;
};

#define POLICY_STATS_INDEX(slot, dir, verdict) \
	((((slot) & (POLICY_SLOTS - 1)) << 2) | ((((dir) - 1) & 1) << 1) | ((verdict) & 1))

/* tern_policy_stats: key POLICY_STATS_INDEX(slot, dir, verdict), value metrics_value
 * (packets, bytes) per CPU. 16384 entries (4096 slots x 2 directions x 2 verdicts), 256 KiB
 * per CPU; an array: never evicted, lookup inlined. Counts judged packets: the first packet
 * of each allowed flow and direction, every denied (or audit would-deny) packet. Writer: the
 * pod programs' policy stage and tern_from_netdev (a local exclusive-ENI backend's ingress);
 * the agent zeroes a slot before giving it to a new policy.
 * Readers: the agent (/metrics, the API's policy view), ternctl bpf policy get. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(max_entries, POLICY_SLOTS * 4);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_policy_stats SEC(".maps");

#define POLICY_NAME_LEN 320 /* namespace (63) + '/' + name (253), NUL-padded */

struct policy_name {
	char name[POLICY_NAME_LEN];
};

/* tern_policy_names: key __u32 slot, value policy_name ("namespace/name"). Hash, 4096
 * entries, allocated as used (~400 bytes each); never evicted: the agent deletes a slot when
 * its policy is gone. Not read by any program: it is here so that the names live next to
 * the slots (pinned, they survive an agent restart, which keeps the slots stable, and
 * ternctl reads them with the agent down). Writer: agent policy reconciler. Readers: the
 * agent on start, ternctl, `bpftool map dump`. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct policy_name);
	__uint(max_entries, POLICY_SLOTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_policy_names SEC(".maps");

/* One policy verdict, for `ternctl monitor`: a drop_event (kind EVENT_POLICY; reason
 * REASON_DROP_POLICY, REASON_POLICY_AUDIT or REASON_POLICY_ALLOWED; the packet's own
 * addresses, before a service flow is translated) followed by what was judged. */
struct policy_event {
	struct drop_event pkt;
	__u32 subject;      /* identity of the local pod the policy protects */
	__u32 peer_identity; /* the peer's pod identity, else its ipBlock prefix's, else 0 */
	__u32 slot;         /* the policy that decided (tern_policy_names), 0 unknown */
	__be32 peer;        /* the peer's address (a service flow's backend, not the frontend) */
	__be16 port;        /* the destination port judged (the subject's for ingress) */
	__u8 policy_dir;    /* enum policy_dir: which of the subject's policies judged */
	__u8 verdict;       /* enum policy_verdict (an audit would-deny is POLICY_DENIED) */
};

/* Referenced so that BTF keeps the structs only the Go side uses. */
struct policy_event __policy_event_btf __attribute__((unused, section(".maps.btf_only")));
struct policy_stats_key __policy_stats_key_btf __attribute__((unused, section(".maps.btf_only")));

/* What the policy stage found for one judged packet. */
struct policy_decision {
	__u32 slot;
	__u32 peer_identity;
	bool allowed;
	bool audit;
	bool isolated; /* policies judged it (else: not isolated, itself, or the node) */
};

static __always_inline struct policy_value *policy_match(__u32 subject, __u32 peer, __u8 dir, __u8 proto,
							 __be16 port)
{
	struct policy_key k = {
		.prefixlen = POLICY_KEY_BITS,
		.subject = bpf_htonl(subject),
		.peer = bpf_htonl(peer),
		.dir = dir,
		.proto = proto,
		.port = port,
	};

	return bpf_map_lookup_elem(&tern_policy, &k);
}

/* Decide whether the subject endpoint's policies allow peer on (proto, port) in dir. */
static __always_inline void policy_decide(const struct endpoint_value *ep, __u8 dir, __be32 peer, __u8 proto,
					  __be16 port, struct policy_decision *d)
{
	__u32 subject = ep->identity;
	struct policy_iso_value *iso = bpf_map_lookup_elem(&tern_policy_isolation, &subject);
	struct policy_value *v;

	d->allowed = true;
	if (!iso)
		return;
	if (!(iso->flags & (dir == POLICY_INGRESS ? POL_ISO_INGRESS : POL_ISO_EGRESS)))
		return;
	d->audit = !!(iso->flags & POL_ISO_AUDIT);
	if (peer == ep->addr)
		return; /* a pod cannot block access to itself */

	struct policy_cidr_key ck = { .prefixlen = 32, .addr = peer };
	struct policy_cidr_value *cv = bpf_map_lookup_elem(&tern_policy_cidrs, &ck);
	__u32 cidr = cv ? cv->identity : IDENTITY_ANY;

	if (cidr == IDENTITY_HOST)
		return;
	d->isolated = true;
	d->peer_identity = cidr;
	struct ipcache_value *ipc = ipcache_lookup(peer);
	if (ipc && ipc->identity != IDENTITY_ANY) {
		d->peer_identity = ipc->identity;
		v = policy_match(subject, ipc->identity, dir, proto, port);
		if (v)
			goto allowed;
	}
	if (cidr != IDENTITY_ANY) {
		v = policy_match(subject, cidr, dir, proto, port);
		if (v)
			goto allowed;
	}
	v = policy_match(subject, IDENTITY_ANY, dir, proto, port);
	if (v)
		goto allowed;
	d->allowed = false;
	v = policy_match(subject, IDENTITY_ANY, dir | POLICY_DIR_ISOLATOR, 0, 0);
	if (v)
		d->slot = v->policy;
	return;
allowed:
	d->slot = v->policy;
}

/* Send a policy_event. A global function (not static, not inlined): the verifier checks it
 * once on its own instead of once per path that reaches it, which keeps the pod programs'
 * verifier budget (docs/reliability.md). A global function takes at most five arguments, all
 * scalars besides the context, hence the packing:
 *   what  = reason | count_dir << 8 | policy_dir << 16 | verdict << 24 | port << 32
 *   ids   = subject | peer_identity << 32
 *   where = slot | peer << 32 */
__attribute__((noinline)) int tern_policy_event(struct __sk_buff *skb, __u64 what, __u64 ids, __u64 where)
{
	struct event_limit *l = event_allowed();
	struct policy_event ev = {};

	if (!skb || !l)
		return 0;
	event_fill(skb, &ev.pkt, (__u8)what, (__u8)(what >> 8));
	ev.pkt.kind = EVENT_POLICY;
	ev.policy_dir = (__u8)(what >> 16);
	ev.verdict = (__u8)(what >> 24);
	ev.port = (__be16)(what >> 32);
	ev.subject = (__u32)ids;
	ev.peer_identity = (__u32)(ids >> 32);
	ev.slot = (__u32)where;
	ev.peer = (__be32)(where >> 32);
	if (bpf_ringbuf_output(&tern_events, &ev, sizeof(ev), 0))
		l->lost_full++;
	return 0;
}

/* Count a judged packet against the policy that decided, and report it on tern_events. */
static __always_inline void policy_report(struct __sk_buff *skb, const struct endpoint_value *ep,
					  const struct policy_decision *d, __u8 dir, __be32 peer, __be16 port,
					  __u8 count_dir)
{
	__u8 verdict = d->allowed ? POLICY_ALLOWED : POLICY_DENIED;
	__u32 idx = POLICY_STATS_INDEX(d->slot, dir, verdict);
	struct metrics_value *m = bpf_map_lookup_elem(&tern_policy_stats, &idx);

	if (likely(m)) {
		m->packets++;
		m->bytes += skb->len;
	}
	if (d->allowed && !CFG_POLICY_EVENTS_ALLOWED)
		return;

	__u8 reason = d->allowed ? REASON_POLICY_ALLOWED : (d->audit ? REASON_POLICY_AUDIT : REASON_DROP_POLICY);
	__u64 what = (__u64)reason | (__u64)count_dir << 8 | (__u64)dir << 16 | (__u64)verdict << 24 |
		     (__u64)port << 32;

	tern_policy_event(skb, what, (__u64)ep->identity | (__u64)d->peer_identity << 32,
			  (__u64)d->slot | (__u64)peer << 32);
}

/* Judge a packet of endpoint ep in dir against peer:port, unless the flow's entry caches the
 * verdict (flag). An allowed verdict is cached in the entry, or, when the packet has none
 * yet, in f->policy for flow_track to create the entry with. Returns 0 to go on or a drop
 * reason; a denial is reported here (policy_event), so drop() sends no second event. */
static __always_inline int policy_judge(struct __sk_buff *skb, const struct pkt *p, struct flow *f,
					const struct endpoint_value *ep, __u8 dir, __u16 flag,
					__be32 peer, __be16 port, __u8 count_dir)
{
	struct policy_decision d = {};
	struct ct_value *ct = f->ct;

	if (ct && (ct->policy & flag) && !is_pure_syn(p->tcp_flags))
		return 0;
	policy_decide(ep, dir, peer, p->proto, port, &d);
	if (d.isolated)
		policy_report(skb, ep, &d, dir, peer, port, count_dir);
	if (d.allowed) {
		/* Racy with the other half of a same-node flow setting its bit: a lost bit only
		 * costs one more lookup. */
		if (ct)
			ct->policy |= flag;
		else
			f->policy |= flag;
		return 0;
	}
	if (d.audit) {
		count(skb, REASON_POLICY_AUDIT, count_dir);
		return 0;
	}
	return REASON_DROP_POLICY;
}

/* The ingress policy of a local exclusive-ENI backend (IPC_F_LOCAL | IPC_F_EXCLUSIVE in
 * tern_ipcache) for a flow about to be translated to it with the node's address as its
 * source (exclusive.h): the backend's own tern_to_pod will see the node, which is always
 * allowed, so the real client (peer: an exclusive pod of the node, or an external client of
 * a NodePort) is judged here, where the flow is opened, by the same decision, counters and
 * policy events as tern_to_pod's ingress judgement. Only the open pays it: the flow's later
 * packets follow its SVC entry, and a pure SYN on a reused tuple re-opens the flow
 * (svc_must_repick), so it is judged again. Returns 0 to go on (allowed, audit, not local
 * and exclusive, policy not enforced on the backend) or REASON_DROP_POLICY, reported here.
 * A global function, verified once on its own and shared by tern_from_pod and
 * tern_from_netdev; scalars packed as for tern_policy_event:
 *   flow    = peer | port << 32 | proto << 48   (port: the backend's, network order)
 *   backend = backend address | count_dir << 32 */
__attribute__((noinline)) int policy_local_backend_ingress(struct __sk_buff *skb, __u64 flow, __u64 backend)
{
	__be32 peer = (__be32)flow;
	__be16 port = (__be16)(flow >> 32);
	__u8 proto = (__u8)(flow >> 48);
	__u8 count_dir = (__u8)(backend >> 32);
	struct ipcache_value *ipc = ipcache_lookup((__be32)backend);
	__u16 want = IPC_F_LOCAL | IPC_F_EXCLUSIVE | IPC_F_POLICY;
	struct policy_decision d = {};

	if (!skb || !ipc || (ipc->flags & want) != want)
		return 0;
	/* What policy_decide reads of the backend's endpoint: its address and identity. */
	struct endpoint_value ep = { .addr = (__be32)backend, .identity = ipc->identity };

	policy_decide(&ep, POLICY_INGRESS, peer, proto, port, &d);
	if (d.isolated)
		policy_report(skb, &ep, &d, POLICY_INGRESS, peer, port, count_dir);
	if (d.allowed)
		return 0;
	if (d.audit) {
		count(skb, REASON_POLICY_AUDIT, count_dir);
		return 0;
	}
	return REASON_DROP_POLICY;
}

static __always_inline int policy_excl_backend(struct __sk_buff *skb, const struct pkt *p, __be32 backend,
					       __be16 port, __u8 count_dir)
{
	return policy_local_backend_ingress(skb, (__u64)p->saddr | (__u64)port << 32 | (__u64)p->proto << 48,
					    (__u64)backend | (__u64)count_dir << 32);
}

/* The pod sends p on flow f, to daddr:dport as it leaves (after service translation). */
static __always_inline int policy_from_pod(struct __sk_buff *skb, const struct pkt *p, struct flow *f,
					   __be32 daddr, __be16 dport)
{
	struct endpoint_value *ep = endpoint_of(skb);

	if (!ep || !(ep->flags & EP_F_POLICY))
		return 0;
	if (f->ct && ct_is_reply(f->ct, f->from_a))
		return policy_judge(skb, p, f, ep, POLICY_INGRESS, CT_POL_IN, daddr, p->sport, DIR_FROM_POD);
	return policy_judge(skb, p, f, ep, POLICY_EGRESS, CT_POL_OUT, daddr, dport, DIR_FROM_POD);
}

/* The pod receives p on flow f. */
static __always_inline int policy_to_pod(struct __sk_buff *skb, const struct pkt *p, struct flow *f)
{
	struct endpoint_value *ep = endpoint_of(skb);

	if (!ep || !(ep->flags & EP_F_POLICY))
		return 0;
	/* From the node's own stack (kubelet probes, host-network pods): always allowed. */
	if (skb->ingress_ifindex == 0)
		return 0;
	if (f->ct && ct_is_reply(f->ct, f->from_a))
		return policy_judge(skb, p, f, ep, POLICY_EGRESS, CT_POL_OUT, p->saddr, p->sport, DIR_TO_POD);
	return policy_judge(skb, p, f, ep, POLICY_INGRESS, CT_POL_IN, p->saddr, p->dport, DIR_TO_POD);
}

/* An ICMP packet the pod sends (from_pod) or receives: queries are judged as new flows of
 * protocol ICMP, port 0 (only rules for any protocol match); replies and errors pass. No
 * flow entry: nothing is cached, so every query is judged (and counted). */
static __always_inline int policy_icmp(struct __sk_buff *skb, const struct pkt *p, bool from_pod)
{
	struct endpoint_value *ep = endpoint_of(skb);
	struct flow f = {};
	__u8 type;

	if (!ep || !(ep->flags & EP_F_POLICY) || !p->first_frag)
		return 0;
	if (!from_pod && skb->ingress_ifindex == 0)
		return 0;
	if (bpf_skb_load_bytes(skb, p->l4_off, &type, 1))
		return 0; /* no ICMP header: the stack drops it */
	if (type == ICMP_ECHOREPLY || type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED ||
	    type == ICMP_PARAMETERPROB)
		return 0;
	if (from_pod)
		return policy_judge(skb, p, &f, ep, POLICY_EGRESS, CT_POL_OUT, p->daddr, 0, DIR_FROM_POD);
	return policy_judge(skb, p, &f, ep, POLICY_INGRESS, CT_POL_IN, p->saddr, 0, DIR_TO_POD);
}
