/* Finding a flow from its reply. A reply names the backend (address, port), never the VIP;
 * the reverse-NAT index lists the frontends that backend serves, and for each the flow's
 * conntrack key (client, VIP) is tried. The entry must name this very backend, so a client
 * that talks to two VIPs sharing a backend still gets each reply rewritten correctly. */
#pragma once

#include "common.h"
#include "conntrack.h"
#include "lb.h"

struct revnat_hit {
	struct ct_value *ct;
	__be32 vip;
	__be16 vport;
};

static __always_inline bool revnat_find(__be32 backend_addr, __be16 backend_port,
					__be32 client_addr, __be16 client_port, __u8 proto,
					__u64 now, struct revnat_hit *hit)
{
	struct revnat_key rk = { .addr = backend_addr, .port = backend_port, .proto = proto };
	struct revnat_value *rv = bpf_map_lookup_elem(&tern_revnat, &rk);

	if (!rv)
		return false;

	struct ct_key k = { .saddr = client_addr, .sport = client_port, .proto = proto };
	for (__u32 i = 0; i < REVNAT_MAX_FRONTENDS; i++) {
		if (i >= rv->count)
			break;
		k.daddr = rv->frontends[i].addr;
		k.dport = rv->frontends[i].port;
		struct ct_value *ct = ct_lookup(&k, now);
		if (ct && ct->backend_addr == backend_addr && ct->backend_port == backend_port) {
			hit->ct = ct;
			hit->vip = k.daddr;
			hit->vport = k.dport;
			return true;
		}
	}
	return false;
}
