// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Socket-level load balancing (cgroup v2 hooks) and the clean-up of its connected UDP
 * sockets.
 *
 *   tern_sock_connect4      connect():      frontend? -> backend (TCP and UDP)
 *   tern_sock_sendmsg4      sendto():       frontend? -> backend (unconnected UDP)
 *   tern_sock_recvmsg4      recvfrom():     backend given to this socket -> frontend
 *   tern_sock_getpeername4  getpeername():  backend given to this socket -> frontend
 *   tern_sock_*6            the same for IPv6 sockets' v4-mapped addresses (::ffff:VIP)
 *   tern_sock_destroy_udp   (iter/udp, run by the agent after a backend leaves)
 *                           connected UDP socket on a removed backend -> bpf_sock_destroy
 *
 * The LB maps are lb.h's, pinned by name and shared with the pod object; the stages are in
 * lib/sock.h. */

#include "lib/common.h"
#include "lib/metrics.h"
#include "lib/lb.h"
#include "lib/sock.h"

char __license[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/connect4")
int tern_sock_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_fwd(ctx, REASON_SOCK_CONNECT, 0);
}

SEC("cgroup/sendmsg4")
int tern_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_fwd(ctx, REASON_SOCK_SENDMSG, ctx->msg_src_ip4);
}

SEC("cgroup/recvmsg4")
int tern_sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_rev(ctx);
}

SEC("cgroup/getpeername4")
int tern_sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_rev(ctx);
}

/* The same for IPv6 sockets, for their v4-mapped destinations only. */
SEC("cgroup/connect6")
int tern_sock_connect6(struct bpf_sock_addr *ctx)
{
	return sock6_xlate_fwd(ctx, REASON_SOCK_CONNECT);
}

SEC("cgroup/sendmsg6")
int tern_sock_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_xlate_fwd(ctx, REASON_SOCK_SENDMSG);
}

SEC("cgroup/recvmsg6")
int tern_sock_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_xlate_rev(ctx);
}

SEC("cgroup/getpeername6")
int tern_sock_getpeername6(struct bpf_sock_addr *ctx)
{
	return sock6_xlate_rev(ctx);
}

/* Linux 6.5+. The loader loads this program on its own, so a kernel without the kfunc
 * keeps the hooks above. */
extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

/* One record per destroyed socket, read by the agent to log what it did. */
struct sock_destroyed {
	__u64 cookie;
	__be32 addr;
	__be16 port;
	__u16 pad;
};

/* Referenced so that BTF keeps the struct for bpf2go's Go mirror. */
struct sock_destroyed __sock_destroyed_btf __attribute__((unused, section(".maps.btf_only")));

SEC("iter/udp")
int tern_sock_destroy_udp(struct bpf_iter__udp *ctx)
{
	struct sock *sk = (struct sock *)ctx->udp_sk;

	if (!sk)
		return 0;

	struct sock_destroyed rec = {
		.cookie = bpf_get_socket_cookie(sk),
		.addr = sk->__sk_common.skc_daddr,
		.port = sk->__sk_common.skc_dport,
	};

	if (!rec.addr || !sock_stale_udp(rec.cookie, rec.addr, rec.port))
		return 0;
	if (bpf_sock_destroy((struct sock_common *)sk))
		return 0;
	count_event(REASON_SOCK_DESTROY, DIR_SOCK);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}
