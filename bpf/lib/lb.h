/* Service load balancing state: the ClusterIP frontends, their backends, and the reverse
 * index from a backend to the frontends it serves. All three maps are written only by the
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
 * frontends); a plain hash, never evicted: the reconciler adds and deletes. Writer: agent
 * service reconciler. Reader: from-pod program (new and established flows). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
	__uint(max_entries, 131072);
	__uint(map_flags, BPF_F_NO_PREALLOC);
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

/* A backend (address, port, protocol) serves at most this many frontends whose replies we
 * can reverse-NAT. The reconciler counts and logs overflows. */
#define REVNAT_MAX_FRONTENDS 8

struct revnat_key {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct revnat_frontend {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

struct revnat_value {
	__u32 count;
	struct revnat_frontend frontends[REVNAT_MAX_FRONTENDS];
};

/* tern_revnat: key revnat_key (backend address, port, protocol), value revnat_value (the
 * frontends that backend serves). A reply from a backend names the backend, not the VIP;
 * this index gives the candidate VIPs so the reply can find its flow's single conntrack
 * entry, which is keyed by the client's original tuple. Size from the loader (default
 * 262144); never evicted. Writer: agent service reconciler. Reader: to-pod and the
 * hairpin path of from-pod. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct revnat_key);
	__type(value, struct revnat_value);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_revnat SEC(".maps");

static __always_inline struct svc_value *lb_lookup_service(__be32 addr, __be16 port, __u8 proto)
{
	struct svc_key k = { .addr = addr, .port = port, .proto = proto };

	return bpf_map_lookup_elem(&tern_services, &k);
}

/* Uniform random choice among the ready backends. Returns NULL when the slot is missing,
 * which the reconciler's write order should make impossible. */
static __always_inline struct backend_value *lb_pick_backend(const struct svc_value *svc)
{
	struct backend_key k = {
		.svc_id = svc->id,
		.slot = (bpf_get_prandom_u32() % svc->backend_count) + 1,
	};

	return bpf_map_lookup_elem(&tern_backends, &k);
}
