/* IPv4 fragments: only the first fragment carries the L4 ports that service lookup and
 * conntrack need. When a first fragment passes, its ports are remembered under the
 * datagram's (source, destination, id, protocol), and later fragments borrow them. A
 * non-first fragment whose head was not seen cannot be classified: it passes when it is
 * not addressed to a service VIP and is dropped with a reason when it is. */
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
 * 8192 datagrams in flight: fragments are rare and short-lived, eviction only costs the
 * rest of that datagram. Writer and reader: from-pod and to-pod. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_value);
	__uint(max_entries, 8192);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_frags SEC(".maps");

/* Returns true when the packet's ports are known (not a fragment, a first fragment, or a
 * later fragment whose head was seen). */
static __always_inline bool frag_ports(struct pkt *p)
{
	if (!p->is_frag)
		return true;
	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP && p->proto != IPPROTO_SCTP)
		return true;

	struct frag_key k = { .saddr = p->saddr, .daddr = p->daddr, .id = p->ip_id, .proto = p->proto };
	if (p->first_frag) {
		struct frag_value v = { .sport = p->sport, .dport = p->dport };
		bpf_map_update_elem(&tern_frags, &k, &v, BPF_ANY);
		return true;
	}
	struct frag_value *v = bpf_map_lookup_elem(&tern_frags, &k);
	if (!v)
		return false;
	p->sport = v->sport;
	p->dport = v->dport;
	return true;
}
