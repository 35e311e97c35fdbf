/* Service load balancing state: the ClusterIP frontends, their backends, which backends
 * each frontend has, and the per-frontend options (affinity timeout, Maglev table size).
 * These maps are written only by the agent's service reconciler (service/lbmap), which
 * computes them from Service and EndpointSlice objects; the datapath only reads them. The
 * one datapath-written map, the affinity table, is in affinity.h, the Maglev tables in
 * maglev.h. lb_pick_backend, at the end, is the one backend choice both the packet path
 * (svc.h) and the socket-LB object use. */
#pragma once

#include "common.h"
#include "affinity.h"
#include "maglev.h"

/* Frontend of a Service port: (VIP, port, protocol). */
struct svc_key {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 scope; /* enum svc_scope (was padding: 0 in entries older agents wrote) */
};

/* Which clients an entry serves. An external frontend with externalTrafficPolicy Local
 * (SVC_F_EXT_LOCAL) has a twin under SVC_SCOPE_INTERNAL with every endpoint of the Service:
 * pods and host processes reaching a NodePort or LoadBalancer IP are sent to any endpoint,
 * as kube-proxy short-circuits in-cluster clients, while external clients get this node's
 * endpoints only. */
enum svc_scope {
	SVC_SCOPE_ALL = 0,
	SVC_SCOPE_INTERNAL = 1,
};

struct svc_value {
	__u32 id;            /* stable id chosen by the agent; keys backend slots */
	__u16 backend_count; /* ready backends in slots 1..backend_count; 0 means reject */
	__u16 flags;         /* enum svc_flag */
};

enum svc_flag {
	SVC_F_AFFINITY = 1 << 0,   /* sessionAffinity ClientIP; timeout in tern_lb_svc_opts */
	SVC_F_MAGLEV = 1 << 1,     /* pick by tern_lb_maglev; table size in tern_lb_svc_opts */
	SVC_F_DROP_EMPTY = 1 << 2, /* no backends: drop (no local endpoint), not reject */
	SVC_F_EXTERNAL = 1 << 3,   /* NodePort, LoadBalancer IP or externalIP: served on the netdevs too */
	SVC_F_SRC_RANGES = 1 << 4, /* loadBalancerSourceRanges: clients outside tern_lb_src_ranges drop */
	SVC_F_EXT_LOCAL = 1 << 5,  /* externalTrafficPolicy Local: in-cluster clients use the SVC_SCOPE_INTERNAL twin */
};

/* tern_services: key svc_key, value svc_value. Size from the loader (default 131072
 * frontends); a plain hash, never evicted: the reconciler adds and deletes. Preallocated
 * (about 10 MB at the default size): every forward packet looks a frontend up, and with 100,000
 * frontends elements allocated one by one were scattered over memory and missed the TLB. Writer: agent
 * service reconciler. Reader: from-pod program (new and established flows). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
	__uint(max_entries, 131072);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_services SEC(".maps");

struct backend_key {
	__u32 svc_id;
	__u32 slot; /* 1..backend_count */
};

struct backend_value {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

/* tern_backends: key backend_key (service id, slot), value backend_value (address, target
 * port). Size from the loader (default 524288 slots); never evicted. Writer: agent service
 * reconciler (slots first, then the frontend's backend_count, so a reader never sees a
 * count beyond the filled slots). Reader: from-pod program when it picks a backend. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct backend_key);
	__type(value, struct backend_value);
	__uint(max_entries, 524288);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_backends SEC(".maps");

struct member_key {
	__u32 svc_id;
	__be32 addr;
	__be16 port;
	__u16 pad;
};

/* tern_lb_members: key member_key (frontend id, backend address, port), value the backend's
 * slot. It answers "is this backend still one of this frontend's" in one lookup, without
 * knowing its slot (slots move when a backend leaves). Established UDP flows ask it on every
 * datagram and TCP on every new SYN, so a removed backend gets no more datagrams from a
 * long-lived socket and no new connection on a reused tuple, while established TCP flows to
 * it continue (as with kube-proxy). Size from the loader (default 524288, like the slots);
 * never evicted. Writer: agent service reconciler (a member is added before its slot and
 * removed after). Reader: from-pod program. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct member_key);
	__type(value, __u32);
	__uint(max_entries, 524288);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_lb_members SEC(".maps");

/* What a frontend with SVC_F_AFFINITY or SVC_F_MAGLEV needs beyond svc_value. A map of its
 * own rather than a longer svc_value: tern_services keeps the layout older agents pinned,
 * so an upgrade takes it over as it is. */
struct svc_opts {
	__u32 affinity_timeout_s; /* sessionAffinityConfig.clientIP.timeoutSeconds */
	__u32 maglev_size;        /* entries in the frontend's Maglev table (a prime) */
};

/* tern_lb_svc_opts: key the frontend id (svc_value.id), value svc_opts. Size from the loader
 * (default 131072, like the frontends); never evicted: written before the frontend's flags
 * point at it and deleted after they no longer do. Not preallocated: only frontends with
 * affinity or Maglev have one. Writer: agent service reconciler. Readers: lb_pick_backend
 * (from-pod) and sock_select_backend (sock hooks). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct svc_opts);
	__uint(max_entries, 131072);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_lb_svc_opts SEC(".maps");

struct src_range_key {
	__u32 prefixlen; /* 32 (the frontend id) + the CIDR's length */
	__u32 svc_id;    /* svc_value.id */
	__be32 addr;     /* the allowed CIDR's address */
};

/* tern_lb_src_ranges: key src_range_key (frontend id, allowed client CIDR), value __u8
 * (unused, 1). The loadBalancerSourceRanges of each LoadBalancer IP frontend that has them
 * (svc_value.flags SVC_F_SRC_RANGES): a new flow from a client outside them is dropped. LPM
 * trie, 65536 prefixes; never evicted: written before the frontend's flag is set, deleted
 * after it is cleared. Writer: agent service reconciler. Readers: from-netdev (external
 * clients) and from-pod (in-cluster clients), on a flow's first packet, and the sock hooks
 * (a socket whose source address is known, sock.h). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct src_range_key);
	__type(value, __u8);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_lb_src_ranges SEC(".maps");

/* Whether client is inside the source ranges of the frontend with id. A global function:
 * the verifier checks it once on its own instead of once per path through the caller
 * (inlined, it grew tern_from_pod's verification by a third). */
__attribute__((noinline)) int lb_source_in_ranges(__u32 id, __be32 client)
{
	struct src_range_key k = { .prefixlen = 64, .svc_id = id, .addr = client };

	return bpf_map_lookup_elem(&tern_lb_src_ranges, &k) != NULL;
}

/* Whether client may open a flow to svc: always, unless the frontend has source ranges
 * and none holds it. */
static __always_inline bool lb_source_allowed(const struct svc_value *svc, __be32 client)
{
	if (!(svc->flags & SVC_F_SRC_RANGES))
		return true;
	return lb_source_in_ranges(svc->id, client);
}

static __always_inline struct svc_value *lb_lookup_service(__be32 addr, __be16 port, __u8 proto)
{
	struct svc_key k = { .addr = addr, .port = port, .proto = proto };

	return bpf_map_lookup_elem(&tern_services, &k);
}

/* The frontend an in-cluster client (a pod, a host process) reaches: the entry itself, or
 * for an externalTrafficPolicy Local frontend its cluster-wide twin when there is one. */
static __always_inline struct svc_value *lb_lookup_internal(__be32 addr, __be16 port, __u8 proto)
{
	struct svc_value *svc = lb_lookup_service(addr, port, proto);

	if (!svc || !(svc->flags & SVC_F_EXT_LOCAL))
		return svc;
	struct svc_key k = { .addr = addr, .port = port, .proto = proto, .scope = SVC_SCOPE_INTERNAL };
	struct svc_value *twin = bpf_map_lookup_elem(&tern_services, &k);

	return twin ?: svc;
}

static __always_inline struct backend_value *lb_backend(__u32 svc_id, __u32 slot)
{
	struct backend_key k = { .svc_id = svc_id, .slot = slot };

	return bpf_map_lookup_elem(&tern_backends, &k);
}

static __always_inline bool lb_is_member(__u32 svc_id, __be32 addr, __be16 port)
{
	struct member_key k = { .svc_id = svc_id, .addr = addr, .port = port };

	return bpf_map_lookup_elem(&tern_lb_members, &k) != NULL;
}

/* The backend a new connection or datagram of svc goes to, from a random number the caller
 * draws (the tc path and the socket hooks share it, so a change of algorithm, affinity or
 * Maglev, is made here once). NULL: the slot the count promised is missing. */
static __always_inline struct backend_value *lb_select_backend(const struct svc_value *svc, __u32 rnd)
{
	return lb_backend(svc->id, (rnd % svc->backend_count) + 1);
}

static __always_inline __u32 lb_member_slot(__u32 svc_id, __be32 addr, __be16 port)
{
	struct member_key k = { .svc_id = svc_id, .addr = addr, .port = port };
	__u32 *slot = bpf_map_lookup_elem(&tern_lb_members, &k);

	return slot ? *slot : 0;
}

static __always_inline __u32 lb_mix(__u32 h)
{
	/* murmur3's finaliser: every input bit reaches every output bit. */
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* The hash Maglev selects by: the flow's 5-tuple as the client sent it, so the socket path
 * (which sees the same tuple at connect) and the packet path agree. */
static __always_inline __u32 lb_tuple_hash(__be32 saddr, __be32 daddr, __be16 sport, __be16 dport, __u8 proto)
{
	__u32 h = lb_mix(saddr ^ 0x9e3779b9);

	h = lb_mix(h ^ daddr);
	h = lb_mix(h ^ (((__u32)sport << 16) | dport));
	return lb_mix(h ^ proto);
}

/* The backend slot (1..backend_count) a new flow of client with tuple hash takes at svc,
 * shared by the packet path (svc.h) and the socket-LB object:
 *   1. affinity (SVC_F_AFFINITY): the backend the client's live entry names, if it is still
 *      one of the frontend's (the membership index answers with its current slot);
 *   2. Maglev (SVC_F_MAGLEV): the slot the table entry for hash names;
 *   3. otherwise (or when the table lacks the entry) a random slot.
 * The caller has checked backend_count > 0. The affinity entry is written or refreshed by
 * lb_pick_backend itself once a slot is chosen, as kube-proxy refreshes its "recent" entry
 * on every new connection. */
static __always_inline __u32 lb_pick_backend(const struct svc_value *svc, __u32 hash, __be32 client, __u64 now)
{
	__u32 slot = 0;
	struct svc_opts *o = NULL;

	if (svc->flags & (SVC_F_AFFINITY | SVC_F_MAGLEV))
		o = bpf_map_lookup_elem(&tern_lb_svc_opts, &svc->id);
	if (o && (svc->flags & SVC_F_AFFINITY)) {
		struct affinity_value *a = affinity_lookup(svc->id, client, o->affinity_timeout_s, now);
		if (a) {
			/* The membership entry names the backend's slot; the slot is checked to hold
			 * it, since the reconciler moves a backend into a removed one's slot before it
			 * points the membership entry there. */
			__u32 s = lb_member_slot(svc->id, a->addr, a->port);
			struct backend_value *be = s ? lb_backend(svc->id, s) : NULL;
			if (be && be->addr == a->addr && be->port == a->port)
				slot = s;
		}
	}
	if (!slot && o && (svc->flags & SVC_F_MAGLEV))
		slot = maglev_slot(svc->id, o->maglev_size, hash);
	if (!slot || slot > svc->backend_count)
		slot = (bpf_get_prandom_u32() % svc->backend_count) + 1;
	if (o && (svc->flags & SVC_F_AFFINITY)) {
		struct backend_value *be = lb_backend(svc->id, slot);
		if (be)
			affinity_record(svc->id, client, be->addr, be->port, now);
	}
	return slot;
}
