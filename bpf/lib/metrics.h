/* Per-CPU packet counters, keyed by (reason, direction). Every drop carries a reason from
 * enum tern_reason; forwarding outcomes are counted the same way so that ternctl and the
 * agent's /metrics can show what the datapath did with every packet. */
#pragma once

#include "common.h"

/* Fixed-width enums (a clang extension in C) put the names into the map's BTF, so
 * `bpftool map dump` shows REASON_SVC_FORWARD instead of 1. */
#pragma clang diagnostic ignored "-Wfixed-enum-extension"

enum tern_dir : __u8 {
	DIR_FROM_POD = 1,
	DIR_TO_POD = 2,
	DIR_FROM_NETDEV = 3, /* netdev.c: arriving on an ENI or the primary NIC */
	DIR_TO_NETDEV = 4,   /* netdev.c: leaving through one */
	DIR_SOCK = 5,        /* sock.c: socket hooks; counts are calls, bytes stay 0 */
};

/* Keep in sync with loader/reasons.go (a test checks the names against BTF). */
enum tern_reason : __u8 {
	REASON_PASS = 0,            /* left untouched (counted by the netdev programs only) */
	REASON_SVC_FORWARD = 1,     /* DNAT to a backend (new or established flow) */
	REASON_SVC_REVNAT = 2,      /* reverse NAT of a backend's reply */
	REASON_SVC_HAIRPIN = 3,     /* pod reached itself through a Service */
	REASON_SVC_REJECT = 4,      /* no ready endpoints: answered with RST / ICMP */
	REASON_SVC_PORT_SNAT = 5,   /* new service flow whose wire tuple was taken: source port changed */
	REASON_DROP_TRUNCATED = 10, /* packet shorter than its headers claim */
	REASON_DROP_BAD_IP = 11,    /* IPv4 header invalid (IHL < 5, total length) */
	REASON_DROP_CT_FULL = 13,   /* conntrack insert failed */
	REASON_DROP_NAT_FAILED = 14, /* a checksum or store helper failed */
	REASON_DROP_REJECT_FAILED = 15, /* could not build the RST / ICMP reply */
	REASON_DROP_NO_BACKEND_SLOT = 16, /* service counted a backend its slot map lacks */
	REASON_DROP_SCTP_PORT = 17, /* SCTP port translation (CRC32c cannot be patched) */
	REASON_DROP_CT_COLLISION = 18, /* the translated tuple is another live flow's, no free port */
	REASON_SOCK_CONNECT = 19,   /* connect() to a frontend given a backend (TCP or UDP) */
	REASON_SOCK_SENDMSG = 20,   /* unconnected UDP datagram to a frontend sent to a backend */
	REASON_SOCK_REVNAT = 21,    /* recvmsg()/getpeername() shown the frontend, not the backend */
	REASON_SOCK_REJECT = 22,    /* connect()/sendmsg() to a frontend without ready backends refused */
	REASON_SOCK_REVNAT_FULL = 23, /* reverse entry not written: the socket is left untranslated */
	REASON_SOCK_DESTROY = 24,   /* connected UDP socket to a removed backend destroyed */
	REASON_DROP_NO_LOCAL_BACKEND = 25, /* internalTrafficPolicy Local, no endpoint on this node */
	REASON_FWD_PEER = 26,       /* redirected into a pod on this node (bpf_redirect_peer) */
	REASON_FWD_NEIGH = 27,      /* redirected out of an ENI or the primary NIC to the FIB's neighbour */
	REASON_DROP_BW_POLICED = 28, /* bandwidth.h: over the pod's rate and burst (token bucket) */
	REASON_DROP_BW_HORIZON = 29, /* bandwidth.h: EDT departure beyond the horizon */
	REASON_BW_PACED = 30,       /* bandwidth.h: given a later departure time (EDT), passed */
	REASON_DROP_POLICY = 31,    /* NetworkPolicy denied it (from-pod: the pod's egress or its reply; to-pod: its ingress) */
	REASON_POLICY_AUDIT = 32,   /* NetworkPolicy would deny it; passed because the pod's policy is in audit mode */
	REASON_MASQ = 33,           /* pod traffic leaving the VPC: source masqueraded (snat.h) */
	REASON_MASQ_RESTORE = 34,   /* a masqueraded flow's reply or ICMP error: back to the pod */
	REASON_DROP_SNAT_NO_PORT = 35, /* masquerade found no free port in CFG_SNAT_TRIES tries */
	REASON_DROP_SNAT_FULL = 36, /* tern_snat is full: no new masqueraded flow */
	REASON_NODEPORT_FORWARD = 37, /* from-netdev: external client to a local backend, DNAT only */
	REASON_NODEPORT_SNAT = 38,  /* from-netdev: external client (from-pod: exclusive-ENI pod) to a remote backend, DNAT + SNAT to the node */
	REASON_NODEPORT_REVNAT = 39, /* an external client's reply restored (from-netdev: SNAT flow; to-netdev: local backend) */
	REASON_DROP_SRC_RANGE = 40, /* client outside the frontend's loadBalancerSourceRanges */
	REASON_DROP_NODEPORT_NO_ROUTE = 41, /* a translated external client's packet the FIB has no route for */
	REASON_POLICY_ALLOWED = 42, /* NetworkPolicy allowed a new flow: events only (policy.h), never counted here */
	REASON_CT_REPLY_LOST = 43,  /* to-pod, from-pod: a TCP segment with ACK (not RST) and no conntrack entry (the LRU took its live flow's); passed as it is */
	REASON_CT_COLLISION_LATE = 44, /* from-pod: an idle service flow's wire tuple was taken by a newer flow after the LRU took its REVNAT half: TCP reset, UDP moved */
	REASON_SOCK_MAGLEV = 45,    /* sock: a connect()/sendmsg() whose backend the Maglev table chose (source address and port known) */
	REASON_SOCK_DEFER = 46,     /* sock: a frontend left to the tc path (loadBalancerSourceRanges, the client's address not known yet) */
	REASON_SVC_ICMP_ERROR = 47, /* to-pod, from-netdev, to-netdev: an ICMP error about a service flow, its quote turned back to what the client sent (svcicmp.h) */
	__REASON_MAX = 64,
};

/* Only used to give the Go side (and BTF) the key's meaning; the map is indexed by
 * METRICS_INDEX(reason, dir). */
struct metrics_key {
	enum tern_reason reason;
	enum tern_dir dir;
	__u16 pad;
};

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

#define METRICS_INDEX(reason, dir) (((__u32)(dir) << 6) | ((reason) & 0x3f))
#define METRICS_SIZE (6 << 6)

/* tern_metrics: key METRICS_INDEX(reason, direction) = dir*64 + reason, value metrics_value
 * per CPU. Size 384 (directions up to 5, reasons up to 63); an array, so nothing is ever evicted and the
 * lookup is inlined by the verifier (a hash lookup per packet cost ~40 ns here). Written by
 * every program (pod, netdev and sock objects share the pin), read by the agent (/metrics) and
 * ternctl, which sum the per-CPU values. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(max_entries, METRICS_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_metrics SEC(".maps");

/* Referenced so that BTF keeps struct metrics_key and the enums for bpf2go. */
struct metrics_key __metrics_key_btf __attribute__((unused, section(".maps.btf_only")));

static __always_inline void count(struct __sk_buff *skb, __u8 reason, __u8 dir)
{
	__u32 idx = METRICS_INDEX(reason, dir);
	struct metrics_value *v = bpf_map_lookup_elem(&tern_metrics, &idx);

	if (likely(v)) {
		v->packets++;
		v->bytes += skb->len;
	}
}

/* An event without a packet (a socket hook's call): packets counts calls, bytes stay 0. */
static __always_inline void count_event(__u8 reason, __u8 dir)
{
	__u32 idx = METRICS_INDEX(reason, dir);
	struct metrics_value *v = bpf_map_lookup_elem(&tern_metrics, &idx);

	if (likely(v))
		v->packets++;
}

enum event_kind {
	EVENT_DROP = 0,   /* struct drop_event: drop() */
	EVENT_POLICY = 1, /* struct policy_event (policy.h), which starts with a drop_event */
};

/* One dropped packet, for `ternctl monitor`: sent on tern_events by drop(). Addresses and
 * ports are as on the wire (network order), 0 where the packet has none. Other kinds of
 * events start with one (kind says which), so a reader can always decode this much. */
struct drop_event {
	__u64 ts_ns;   /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 ifindex; /* skb->ifindex: the pod's host veth, or the ENI / primary NIC */
	__u32 len;     /* skb->len */
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	enum tern_reason reason;
	enum tern_dir dir;
	__u8 kind; /* enum event_kind */
};

/* tern_events: a ring buffer of struct drop_event and policy_event, 256 KiB (~6,500 events). Nothing is
 * evicted: a full buffer refuses new events, counted in event_limit.lost_full. Writers: drop()
 * in every program, the policy stage (policy.h); at most EVENT_RATE per second per CPU. Reader: `ternctl monitor` (one
 * reader at a time: readers share the consumer position). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_events SEC(".maps");

/* A token bucket kept as time credit: sending an event costs EVENT_COST_NS of credit, credit
 * grows with elapsed time up to EVENT_BURST events' worth. Time credit needs no division. */
#define EVENT_RATE 1000 /* events per second per CPU */
#define EVENT_COST_NS (1000000000ULL / EVENT_RATE)
#define EVENT_BURST 200
#define EVENT_BURST_NS (EVENT_BURST * EVENT_COST_NS)

struct event_limit {
	__u64 last_ns;   /* when credit was last added */
	__u64 credit_ns; /* time credit; an event costs EVENT_COST_NS */
	__u64 lost_rate; /* events not sent: over the rate */
	__u64 lost_full; /* events not sent: tern_events full (no reader, or a slow one) */
};

/* tern_event_limit: key 0, value event_limit per CPU (1 entry; an array, never evicted).
 * Writer: drop(), the CPU's own entry. Reader: `ternctl monitor` (the lost counts). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct event_limit);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_event_limit SEC(".maps");

/* Referenced so that BTF keeps struct drop_event (a ring buffer has no value type). */
struct drop_event __drop_event_btf __attribute__((unused, section(".maps.btf_only")));

/* event_allowed takes one event's credit from this CPU's bucket, or counts the event lost. */
static __always_inline struct event_limit *event_allowed(void)
{
	__u32 zero = 0;
	struct event_limit *l = bpf_map_lookup_elem(&tern_event_limit, &zero);
	__u64 now, credit;

	if (!l)
		return NULL;
	now = bpf_ktime_get_ns();
	credit = l->credit_ns + (now - l->last_ns);
	if (credit > EVENT_BURST_NS)
		credit = EVENT_BURST_NS;
	l->last_ns = now;
	if (credit < EVENT_COST_NS) {
		l->credit_ns = credit;
		l->lost_rate++;
		return NULL;
	}
	l->credit_ns = credit - EVENT_COST_NS;
	return l;
}

/* event_fill reads the addresses and ports with bpf_skb_load_bytes rather than the parsed
 * headers: drop() is called before parsing succeeds too (a truncated or bad header). */
static __always_inline void event_fill(struct __sk_buff *skb, struct drop_event *ev, __u8 reason, __u8 dir)
{
	struct iphdr ip;
	__be16 ports[2];

	ev->ts_ns = bpf_ktime_get_ns();
	ev->ifindex = skb->ifindex;
	ev->len = skb->len;
	ev->reason = reason;
	ev->dir = dir;
	if (skb->protocol == bpf_htons(ETH_P_IP) && bpf_skb_load_bytes(skb, 14, &ip, sizeof(ip)) == 0) {
		ev->saddr = ip.saddr;
		ev->daddr = ip.daddr;
		ev->proto = ip.protocol;
		if (ip.ihl >= 5 && (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP ||
				    ip.protocol == IPPROTO_SCTP) &&
		    bpf_skb_load_bytes(skb, 14 + ip.ihl * 4, ports, sizeof(ports)) == 0) {
			ev->sport = ports[0];
			ev->dport = ports[1];
		}
	}
}

static __always_inline void emit_drop(struct __sk_buff *skb, __u8 reason, __u8 dir)
{
	struct event_limit *l = event_allowed();
	struct drop_event ev = {};

	if (!l)
		return;
	event_fill(skb, &ev, reason, dir);
	if (bpf_ringbuf_output(&tern_events, &ev, sizeof(ev), 0))
		l->lost_full++;
}

static __always_inline int drop(struct __sk_buff *skb, __u8 reason, __u8 dir)
{
	count(skb, reason, dir);
	/* The policy stage sent a policy_event for it already, naming the policy. */
	if (reason != REASON_DROP_POLICY)
		emit_drop(skb, reason, dir);
	return TC_ACT_SHOT;
}
