/* IPv4 fragments: only the first fragment carries the L4 ports that service lookup and
 * conntrack need. When a first fragment is translated (a service flow or its reply), its
 * ports are remembered under the datagram's original (source, destination, id, protocol),
 * and later fragments borrow them to get the same translation (addresses only). Heads that
 * need no translation are not remembered, so fragmented traffic that is not service
 * traffic never fills the map, and a later fragment with no remembered head passes
 * untouched: it is either not service traffic or, if its head was evicted, addressed to a
 * VIP that nothing routes (the datagram is lost, as it would be if dropped here). */
#pragma once

#include "common.h"
#include "parse.h"

struct frag_key {
	__be32 saddr;
	__be32 daddr;
	__u16 id;
	__u8 proto;
	__u8 pad;
};

struct frag_value {
	__be16 sport;
	__be16 dport;
};

/* tern_frags: key frag_key, value frag_value (the ports from the first fragment). LRU,
 * 8192 translated datagrams in flight: fragments are rare and short-lived, eviction only
 * costs the rest of that datagram. Writer and reader: from-pod and to-pod. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_value);
	__uint(max_entries, 8192);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_frags SEC(".maps");

/* Returns true when the packet's ports are known: not a fragment, a first fragment, or a
 * later fragment whose translated head was seen. */
static __always_inline bool frag_ports(struct pkt *p)
{
	if (!p->is_frag || p->first_frag)
		return true;

	struct frag_key k = { .saddr = p->saddr, .daddr = p->daddr, .id = p->ip_id, .proto = p->proto };
	struct frag_value *v = bpf_map_lookup_elem(&tern_frags, &k);
	if (!v)
		return false;
	p->sport = v->sport;
	p->dport = v->dport;
	return true;
}

/* Remember a translated first fragment's ports for the rest of its datagram. p holds the
 * addresses as they arrived (the translation rewrote the packet, not p). */
static __always_inline void frag_remember(const struct pkt *p)
{
	if (!p->is_frag || !p->first_frag)
		return;

	struct frag_key k = { .saddr = p->saddr, .daddr = p->daddr, .id = p->ip_id, .proto = p->proto };
	struct frag_value v = { .sport = p->sport, .dport = p->dport };
	bpf_map_update_elem(&tern_frags, &k, &v, BPF_ANY);
}
