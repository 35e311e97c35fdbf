/* Socket-level load balancing: the stages of the cgroup hooks in sock.c.
 *
 *   sock_pick       connect()/sendmsg() to a frontend: check loadBalancerSourceRanges
 *                   against the socket's source (sock_source; unknown: leave the frontend to
 *                   the tc path), pick a backend (sock_select_backend: sessionAffinity per
 *                   network namespace, else Maglev when source address and port are known,
 *                   else random), remember the frontend for this socket and backend
 *                   (sock4_/sock6_xlate_fwd hand the kernel the backend); no backend: refuse,
 *                   or time out when the frontend drops (internalTrafficPolicy Local)
 *   sock_frontend   recvmsg()/getpeername() seeing a backend this socket was given: the
 *                   frontend to show instead (sock4_/sock6_xlate_rev)
 *   sock_stale_udp  (socket iterator) a connected UDP socket whose backend left its frontend
 *
 * The socket never learns the backend's address, and its packets carry the backend's from
 * the first one: the tc programs see them as ordinary pod traffic and translate nothing. */
#pragma once

#include "common.h"
#include "lb.h"
#include "metrics.h"

#define SYS_REJECT 0
#define SYS_PROCEED 1

#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif
#ifndef ETIMEDOUT
#define ETIMEDOUT 110
#endif

/* Set by the loader from what the kernel offers (loader/sock.go). */
/* bpf_set_retval (Linux 5.18): a refused connect() fails with ECONNREFUSED, as kube-proxy's
 * REJECT makes it, rather than the hook's default EPERM. */
volatile const __u8 CFG_SOCK_HAVE_SET_RETVAL = 1;
/* Translate UDP: only when the recvmsg hooks (recvmsg4, and recvmsg6 where connect6 is used)
 * are attached too, or replies would show the backend. */
volatile const __u8 CFG_SOCK_UDP = 1;
/* The node's own network namespace (its netns cookie; 0: unknown) and the address the node's
 * connections to a LoadBalancer IP leave by (the primary NIC's, where the default route
 * points): an unbound host-network socket's source for loadBalancerSourceRanges. */
volatile const __u64 CFG_SOCK_HOST_NETNS = 0;
volatile const __be32 CFG_SOCK_HOST_ADDR = 0;

struct sock_revnat_key {
	__u64 cookie; /* bpf_get_socket_cookie: unique per socket for the boot */
	__be32 addr;  /* backend */
	__be16 port;
	__u16 pad;
};

struct sock_revnat_value {
	__be32 addr; /* frontend */
	__be16 port;
	__u16 pad;
	__u32 svc_id; /* the frontend's id when the backend was chosen, for the destroy iterator */
};

/* tern_sock_revnat: key sock_revnat_key (socket cookie, backend address, port), value
 * sock_revnat_value (frontend address, port, service id). Size 262144, as Cilium's
 * LB4_REVERSE_NAT_SK_MAP; LRU: entries are never deleted, a closed
 * socket's entry ages out (cookies are never reused within a boot, so a stale entry matches
 * nothing). An evicted live entry makes recvmsg()/getpeername() show the backend. Writer:
 * connect4 and sendmsg4 (sock.c). Readers: recvmsg4 and getpeername4, and the UDP destroy
 * iterator. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sock_revnat_key);
	__type(value, struct sock_revnat_value);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_sock_revnat SEC(".maps");

/* user_port is a __u32 holding a network-order port; the verifier accepts only whole-field
 * loads of it on older kernels. */
static __always_inline __be16 sock_dport(const struct bpf_sock_addr *ctx)
{
	volatile __u32 port = ctx->user_port;

	return (__be16)port;
}

static __always_inline bool sock_proto_on(__u32 proto)
{
	return proto == IPPROTO_TCP || (CFG_SOCK_UDP && proto == IPPROTO_UDP);
}

static __always_inline int sock_reject(void)
{
	count_event(REASON_SOCK_REJECT, DIR_SOCK);
	if (CFG_SOCK_HAVE_SET_RETVAL)
		bpf_set_retval(-ECONNREFUSED);
	return SYS_REJECT;
}

/* A frontend that drops: one without a backend here (SVC_F_DROP_EMPTY: internalTrafficPolicy
 * Local without a local endpoint), or a client outside its loadBalancerSourceRanges
 * (SVC_F_SRC_RANGES). Where kube-proxy drops the SYN and the client's connect()
 * ends, after its retransmissions, with ETIMEDOUT. A socket hook cannot drop a packet it
 * never sees: it fails the call at once with the error the client would get in the end,
 * and sends nothing (docs/conformance.md). */
static __always_inline int sock_drop(__u8 reason)
{
	count_event(reason, DIR_SOCK);
	if (CFG_SOCK_HAVE_SET_RETVAL)
		bpf_set_retval(-ETIMEDOUT);
	return SYS_REJECT;
}

/* sessionAffinity at the socket: the client is the socket's network namespace, as in
 * Cilium's socket LB. At connect() an unbound socket has no source address yet, and every
 * socket of a namespace leaves by the same address anyway (a pod's; the node's for the
 * host-network processes, which kube-proxy's per-source "recent" match treats as one client
 * too). The entries share tern_lb_affinity with the tc path under the frontend id with
 * SOCK_AFFINITY_ID set, so a namespace key never meets an address key. */
#define SOCK_AFFINITY_ID (1u << 31)

static __always_inline __be32 sock_affinity_client(void *ctx)
{
	__u64 c = bpf_get_netns_cookie(ctx);

	return (__be32)(c ^ (c >> 32));
}

/* The socket's own end as far as it is known before the kernel routes the connection: its
 * bound address and port (0 when unbound), the source address a sendmsg() names
 * (IP_PKTINFO), and for an unbound host-network socket the node's address
 * (CFG_SOCK_HOST_ADDR). A pod's unbound socket has no known address here: its namespace has
 * one address, but the hook cannot see which. */
struct sock_src {
	__be32 addr;
	__be16 port;
};

static __always_inline struct sock_src sock_source(struct bpf_sock_addr *ctx, __be32 msg_src)
{
	struct bpf_sock *sk = ctx->sk;
	struct sock_src s = { .addr = sk->src_ip4, .port = bpf_htons((__u16)sk->src_port) };

	if (msg_src)
		s.addr = msg_src;
	if (!s.addr && CFG_SOCK_HOST_NETNS && bpf_get_netns_cookie(ctx) == CFG_SOCK_HOST_NETNS)
		s.addr = CFG_SOCK_HOST_ADDR;
	return s;
}

/* The backend for a new socket of svc (backend_count > 0), by lb_pick_backend's rules with
 * the socket's means:
 *   1. affinity: its namespace's live entry's backend, if still a member;
 *   2. Maglev: the table entry for the 5-tuple hash the tc path would compute (lb_tuple_hash),
 *      when the socket's source address and port are both known (bound, or the node's
 *      address for a host socket bound to a port), so such a socket gets the backend the tc
 *      path would give the same tuple on any node. An unbound socket's port is chosen by the
 *      kernel after this hook: it gets a random backend (docs/socket-lb.md says why that
 *      loses nothing Maglev gives: the socket itself keeps its backend);
 *   3. random.
 * The affinity entry is then written or refreshed, as kube-proxy refreshes "recent" on every
 * new connection. */
static __always_inline struct backend_value *sock_select_backend(void *ctx, const struct svc_value *svc,
								 struct sock_src src, __be32 vip, __be16 vport,
								 __u8 proto)
{
	struct svc_opts *o = NULL;
	__u32 slot = 0;
	__u32 id = svc->id | SOCK_AFFINITY_ID;
	__be32 client = 0;
	__u64 now = bpf_ktime_get_coarse_ns();

	if (svc->flags & (SVC_F_AFFINITY | SVC_F_MAGLEV))
		o = bpf_map_lookup_elem(&tern_lb_svc_opts, &svc->id);
	if (o && (svc->flags & SVC_F_AFFINITY)) {
		client = sock_affinity_client(ctx);
		struct affinity_value *a = affinity_lookup(id, client, o->affinity_timeout_s, now);

		if (a) {
			__u32 s = lb_member_slot(svc->id, a->addr, a->port);
			struct backend_value *be = s ? lb_backend(svc->id, s) : NULL;

			if (be && be->addr == a->addr && be->port == a->port)
				slot = s;
		}
	}
	if (!slot && o && (svc->flags & SVC_F_MAGLEV) && src.addr && src.port) {
		slot = maglev_slot(svc->id, o->maglev_size, lb_tuple_hash(src.addr, vip, src.port, vport, proto));
		if (slot)
			count_event(REASON_SOCK_MAGLEV, DIR_SOCK);
	}
	if (!slot || slot > svc->backend_count)
		slot = (bpf_get_prandom_u32() % svc->backend_count) + 1;

	struct backend_value *be = lb_backend(svc->id, slot);

	if (o && (svc->flags & SVC_F_AFFINITY) && be)
		affinity_record(id, client, be->addr, be->port, now);
	return be;
}

/* connect()/sendmsg() to (vip, vport): a frontend gets a backend, returned in *addr, *port
 * (SOCK_XLATE). Anything else, or a frontend whose backend cannot be remembered, goes on
 * untouched (SOCK_PASS: to the tc path, which translates it per packet for pods). */
enum { SOCK_PASS, SOCK_XLATE, SOCK_REFUSE, SOCK_DROP, SOCK_DROP_RANGE };

static __always_inline int sock_pick(struct bpf_sock_addr *ctx, __u32 proto, __be32 vip, __be16 vport,
				     __u8 reason, __be32 msg_src, __be32 *addr, __be16 *port)
{
	if (!sock_proto_on(proto))
		return SOCK_PASS;

	struct svc_value *svc = lb_lookup_internal(vip, vport, proto);

	if (!svc)
		return SOCK_PASS;

	/* Only source ranges and Maglev need the socket's source: other frontends skip the reads. */
	struct sock_src src = {};

	if (svc->flags & (SVC_F_SRC_RANGES | SVC_F_MAGLEV))
		src = sock_source(ctx, msg_src);

	/* loadBalancerSourceRanges, checked before anything else as the tc path does. A client
	 * whose address is not known yet (a pod's unbound socket) is left to the tc path, which
	 * checks its first packet's real source (from-pod; counted there as drop_src_range). */
	if (svc->flags & SVC_F_SRC_RANGES) {
		if (!src.addr) {
			count_event(REASON_SOCK_DEFER, DIR_SOCK);
			return SOCK_PASS;
		}
		if (!lb_source_in_ranges(svc->id, src.addr))
			return SOCK_DROP_RANGE;
	}
	if (svc->backend_count == 0)
		return (svc->flags & SVC_F_DROP_EMPTY) ? SOCK_DROP : SOCK_REFUSE;

	struct backend_value *be = sock_select_backend(ctx, svc, src, vip, vport, (__u8)proto);

	if (!be) {
		count_event(REASON_DROP_NO_BACKEND_SLOT, DIR_SOCK);
		return SOCK_PASS;
	}

	struct sock_revnat_key k = {
		.cookie = bpf_get_socket_cookie(ctx),
		.addr = be->addr,
		.port = be->port,
	};
	struct sock_revnat_value v = { .addr = vip, .port = vport, .svc_id = svc->id };

	if (bpf_map_update_elem(&tern_sock_revnat, &k, &v, BPF_ANY)) {
		count_event(REASON_SOCK_REVNAT_FULL, DIR_SOCK);
		return SOCK_PASS;
	}
	count_event(reason, DIR_SOCK);
	*addr = be->addr;
	*port = be->port;
	return SOCK_XLATE;
}

/* The backend this socket was given for (addr, port), or NULL. */
static __always_inline struct sock_revnat_value *sock_frontend(void *ctx, __u32 proto, __be32 addr, __be16 port)
{
	if (!sock_proto_on(proto))
		return NULL;

	struct sock_revnat_key k = { .cookie = bpf_get_socket_cookie(ctx), .addr = addr, .port = port };
	struct sock_revnat_value *v = bpf_map_lookup_elem(&tern_sock_revnat, &k);

	if (v)
		count_event(REASON_SOCK_REVNAT, DIR_SOCK);
	return v;
}

/* IPv4 sockets. */
static __always_inline int sock4_xlate_fwd(struct bpf_sock_addr *ctx, __u8 reason, __be32 msg_src)
{
	__be32 addr;
	__be16 port;

	switch (sock_pick(ctx, ctx->protocol, ctx->user_ip4, sock_dport(ctx), reason, msg_src, &addr, &port)) {
	case SOCK_REFUSE:
		return sock_reject();
	case SOCK_DROP:
		return sock_drop(REASON_DROP_NO_LOCAL_BACKEND);
	case SOCK_DROP_RANGE:
		return sock_drop(REASON_DROP_SRC_RANGE);
	case SOCK_XLATE:
		ctx->user_ip4 = addr;
		ctx->user_port = (__u32)port;
	}
	return SYS_PROCEED;
}

static __always_inline int sock4_xlate_rev(struct bpf_sock_addr *ctx)
{
	struct sock_revnat_value *v = sock_frontend(ctx, ctx->protocol, ctx->user_ip4, sock_dport(ctx));

	if (v) {
		ctx->user_ip4 = v->addr;
		ctx->user_port = (__u32)v->port;
	}
	return SYS_PROCEED;
}

/* IPv6 sockets talking IPv4 through v4-mapped addresses (::ffff:a.b.c.d), as dual-stack
 * applications (Java, by default) do: their connect() runs the IPv6 hooks. Native IPv6 is
 * left alone (the datapath is IPv4 only). */
static __always_inline bool sock6_v4mapped(const struct bpf_sock_addr *ctx, __be32 *v4)
{
	if (ctx->user_ip6[0] || ctx->user_ip6[1] || ctx->user_ip6[2] != bpf_htonl(0xffff))
		return false;
	*v4 = ctx->user_ip6[3];
	return true;
}

static __always_inline int sock6_xlate_fwd(struct bpf_sock_addr *ctx, __u8 reason)
{
	__be32 vip, addr;
	__be16 port;

	if (!sock6_v4mapped(ctx, &vip))
		return SYS_PROCEED;
	switch (sock_pick(ctx, ctx->protocol, vip, sock_dport(ctx), reason, 0, &addr, &port)) {
	case SOCK_REFUSE:
		return sock_reject();
	case SOCK_DROP:
		return sock_drop(REASON_DROP_NO_LOCAL_BACKEND);
	case SOCK_DROP_RANGE:
		return sock_drop(REASON_DROP_SRC_RANGE);
	case SOCK_XLATE:
		ctx->user_ip6[3] = addr;
		ctx->user_port = (__u32)port;
	}
	return SYS_PROCEED;
}

static __always_inline int sock6_xlate_rev(struct bpf_sock_addr *ctx)
{
	__be32 addr;

	if (!sock6_v4mapped(ctx, &addr))
		return SYS_PROCEED;

	struct sock_revnat_value *v = sock_frontend(ctx, ctx->protocol, addr, sock_dport(ctx));

	if (v) {
		ctx->user_ip6[3] = v->addr;
		ctx->user_port = (__u32)v->port;
	}
	return SYS_PROCEED;
}

/* Whether a UDP socket connected to (daddr, dport) by connect4 is stuck on a backend that
 * left its frontend. An unconnected socket (daddr 0) or one connected to a non-service
 * address has no entry. */
static __always_inline bool sock_stale_udp(__u64 cookie, __be32 daddr, __be16 dport)
{
	struct sock_revnat_key k = { .cookie = cookie, .addr = daddr, .port = dport };
	struct sock_revnat_value *v = bpf_map_lookup_elem(&tern_sock_revnat, &k);

	return v && !lb_is_member(v->svc_id, daddr, dport);
}
