/* Maglev consistent hashing: each Maglev frontend has a lookup table of M entries (M a
 * prime, chosen by the agent), each naming a backend slot; a flow takes the entry its
 * 5-tuple hash selects. The agent builds the table (service/maglev.go) so that every backend
 * holds about M/N entries and a backend change rewrites few of them, so few flows move.
 *
 * One hash keyed by (frontend, block) rather than a map of per-frontend arrays: it needs no
 * map-in-map (whose inner template fixes the array size and whose update path the upgrade
 * code would have to learn), grows only with the frontends that use Maglev, and is an
 * ordinary pinned map that loader/upgrade.go moves like the others. Entries are grouped by
 * 16 into one value so the kernel's per-element overhead (~50 bytes) is paid once per 16
 * entries: a frontend of 5 backends (M = 509) costs 32 elements, about 3 KB. */
#pragma once

#include "common.h"

#define MAGLEV_BLOCK 16

struct maglev_key {
	__u32 svc_id; /* the frontend's id (svc_value.id) */
	__u32 block;  /* table entry / MAGLEV_BLOCK */
};

struct maglev_value {
	__u16 slot[MAGLEV_BLOCK]; /* backend slot (1..backend_count) of each entry; 0 unset */
};

/* tern_lb_maglev: key maglev_key (frontend id, block), value maglev_value (16 table entries).
 * Size from the loader (default 65536 blocks: 1,048,576 entries, e.g. 2,000 frontends of 5
 * backends); never evicted: the reconciler writes a frontend's blocks before it flags the
 * frontend as Maglev and deletes them after it clears the flag or removes the frontend.
 * Not preallocated: only Maglev frontends use it. Writer: agent service reconciler. Reader:
 * from-pod program (lb_pick_backend) and the socket-LB object (sock_select_backend, for a
 * socket whose source address and port are known). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct maglev_key);
	__type(value, struct maglev_value);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_lb_maglev SEC(".maps");

/* The slot that entry hash % size of the frontend's table names; 0 when it has none. */
static __always_inline __u32 maglev_slot(__u32 svc_id, __u32 size, __u32 hash)
{
	if (!size)
		return 0;
	__u32 idx = hash % size;
	struct maglev_key k = { .svc_id = svc_id, .block = idx / MAGLEV_BLOCK };
	struct maglev_value *v = bpf_map_lookup_elem(&tern_lb_maglev, &k);

	if (!v)
		return 0;
	return v->slot[idx & (MAGLEV_BLOCK - 1)];
}
