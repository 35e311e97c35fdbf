/* Service load balancing state: the ClusterIP frontends, their backends, and which backends
 * each frontend has. All three maps are written only by the
 * agent's service reconciler (service/), which computes them from Service and
 * EndpointSlice objects; the datapath only reads them. */
#pragma once

#include "common.h"

/* Frontend of a Service port: (VIP, port, protocol). */
struct svc_key {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct svc_value {
	__u32 id;            /* stable id chosen by the agent; keys backend slots */
	__u16 backend_count; /* ready backends in slots 1..backend_count; 0 means reject */
	__u16 flags;         /* reserved for session affinity, traffic policies */
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

static __always_inline struct svc_value *lb_lookup_service(__be32 addr, __be16 port, __u8 proto)
{
	struct svc_key k = { .addr = addr, .port = port, .proto = proto };

	return bpf_map_lookup_elem(&tern_services, &k);
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
