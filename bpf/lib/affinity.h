/* sessionAffinity: ClientIP. A client's new flows to a frontend go to the backend its last
 * new flow got, until it has opened none for the frontend's timeout (kube-proxy's "recent"
 * match: its timestamp moves on each new connection, not on every packet). The entry holds
 * the backend's address and port, not its slot: slots move when backends leave, and the
 * caller checks membership (lb.h), so a removed backend is never picked by affinity. */
#pragma once

#include "common.h"

struct affinity_key {
	__u32 svc_id; /* the frontend's id (svc_value.id) */
	__be32 client;
};

struct affinity_value {
	__u64 last_ns; /* bpf_ktime_get_coarse_ns() of the client's last new flow */
	__be32 addr;   /* the backend */
	__be16 port;
	__u16 pad;
};

/* tern_lb_affinity: key affinity_key (frontend id, client address), value affinity_value
 * (when, which backend). Size from the loader (default 65536, as Cilium's); an LRU, so a
 * full map forgets its least recently used clients, which then get a fresh choice (the same
 * as an expired entry). Entries of removed frontends are not deleted: they expire, and a
 * reused frontend id only honours one whose backend is a member of it. Writer and reader:
 * from-pod program (lb_pick_backend) and the socket hooks (sock.h sock_select_backend, under the
 * frontend id with SOCK_AFFINITY_ID set, keyed by network namespace). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_lb_affinity SEC(".maps");

/* The backend the client's affinity entry names, or NULL when it has none or it expired. */
static __always_inline struct affinity_value *affinity_lookup(__u32 svc_id, __be32 client, __u32 timeout_s,
							      __u64 now)
{
	struct affinity_key k = { .svc_id = svc_id, .client = client };
	struct affinity_value *v = bpf_map_lookup_elem(&tern_lb_affinity, &k);

	if (!v || now - v->last_ns > (__u64)timeout_s * NSEC_PER_SEC)
		return NULL;
	return v;
}

static __always_inline void affinity_record(__u32 svc_id, __be32 client, __be32 addr, __be16 port, __u64 now)
{
	struct affinity_key k = { .svc_id = svc_id, .client = client };
	struct affinity_value v = { .last_ns = now, .addr = addr, .port = port };

	bpf_map_update_elem(&tern_lb_affinity, &k, &v, BPF_ANY);
}
