/* Forwarding: the last stage of tern_from_pod. Where the route allows, a pod's packet skips
 * the host stack:
 *
 *   to a pod on this node     bpf_redirect_peer into the pod's namespace (ingress to
 *                             ingress, no backlog queue), after running the to-pod stage
 *                             the redirect skips
 *   out through an ENI or     bpf_redirect to the FIB's neighbour, or bpf_redirect_neigh
 *   the primary NIC           when the neighbour is not resolved yet
 *   anything else             the stack (TC_ACT_OK), as before
 *
 * The route is the kernel's: bpf_fib_lookup with no flags does an input-route lookup
 * through the policy-routing rules (iif = the pod's host veth, the packet's addresses, TOS,
 * protocol and ports), so the per-ENI tables and the "to pod lookup main" / "from pod lookup
 * <ENI table>" rules of datapath/eni.go decide the device exactly as the stack would. What
 * the lookup cannot see is the packet mark (BPF_FIB_LOOKUP_MARK needs Linux 6.10): tern's
 * rules do not match marks, and a node that adds mark-based rules must turn forwarding to
 * "stack".
 *
 * The crux is the destination's tc egress hook. bpf_redirect_peer moves the packet from
 * the source veth's ingress straight to the ingress of the destination veth's peer (the
 * pod's eth0): the host side's egress, where tern_to_pod runs, is never crossed. So before
 * redirecting, this stage does what tern_to_pod would have done:
 *   - conntrack: nothing more. Both programs track a packet in the same node-wide entry of
 *     its wire tuple, and whether it is a reply does not depend on the hook, so the source's
 *     from-pod tracking already did what the destination's to-pod would.
 *   - reverse NAT: a backend's reply on a service flow's translated tuple is restored to
 *     frontend -> client here (counted svc_revnat, to-pod, as tern_to_pod counts it).
 * A destination whose to-pod hook has per-endpoint work (NetworkPolicy enforced, a
 * ingress bandwidth limit: EP_F_POLICY in tern_endpoints, an entry in tern_bandwidth) goes
 * through the stack so that hook runs; so does a source with an egress limit (EDT pacing needs
 * the qdisc path).
 * bpf_redirect and bpf_redirect_neigh transmit on the device, so its egress hook
 * (tern_to_netdev) still runs.
 *
 * Like the stack's forwarding, a redirected packet has its TTL decremented (TTL <= 1 goes to
 * the stack, which sends the ICMP time-exceeded) and its MACs rewritten. Redirected packets
 * do not cross the host's netfilter FORWARD/POSTROUTING chains, as with Cilium's BPF host
 * routing. */
#pragma once

#include "common.h"
#include "config.h"
#include "metrics.h"
#include "parse.h"
#include "conntrack.h"
#include "endpoint.h"
#include "bandwidth.h"
#include "frag.h"
#include "svc.h"

#define AF_INET 2

/* Bits of CFG_FORWARD (loader.Config.Forwarding, probed against the kernel's helpers). */
enum fwd_cfg {
	FWD_CFG_PEER = 1 << 0,  /* bpf_redirect_peer to local pods */
	FWD_CFG_NEIGH = 1 << 1, /* bpf_fib_lookup + bpf_redirect(_neigh) out of ENIs */
};

/* Set by the loader; 0 (every packet to the stack) is what a test gets that sets nothing. */
volatile const __u32 CFG_FORWARD = 0;

/* tern_netdevs: key ifindex (__u32), value __u32 (reserved flags, 0). One entry per ENI
 * link or primary NIC carrying the netdev programs; 256 (an instance has at most a few
 * dozen ENIs); never evicted. Writer: the loader, on AttachNetdev / DetachNetdev (and the
 * agent's GC of detached ENIs through DetachNetdev). Reader: tern_from_pod's forward stage:
 * only a FIB result on one of these devices is redirected out of the node. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 256);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_netdevs SEC(".maps");

static __always_inline bool mac_is_zero(const __u8 *m)
{
	return !(m[0] | m[1] | m[2] | m[3] | m[4] | m[5]);
}

/* Decrement the TTL as a router does. Returns false (leave it to the stack) when it would
 * expire or the header cannot be written. */
static __always_inline bool fwd_dec_ttl(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;

	if ((void *)(ip + 1) > data_end || ip->ttl <= 1)
		return false;
	/* The TTL is the high byte of the 16-bit word it shares with the protocol. */
	__be16 old = bpf_htons((__u16)ip->ttl << 8);
	__be16 new = bpf_htons((__u16)(ip->ttl - 1) << 8);
	ip->ttl--;
	return !bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old, new, 2);
}

static __always_inline bool fwd_set_macs(struct __sk_buff *skb, const __u8 *dmac, const __u8 *smac)
{
	return !bpf_skb_store_bytes(skb, 0, dmac, ETH_ALEN, 0) &&
	       !bpf_skb_store_bytes(skb, ETH_ALEN, smac, ETH_ALEN, 0);
}

/* The to-pod stage for a packet about to be redirected into its destination pod: what
 * tern_to_pod would do once the packet reached the destination's host veth (see above). */
static __always_inline int fwd_to_pod_stage(struct __sk_buff *skb, const struct pkt *p,
					    const struct ct_value *ct, bool reply)
{
	if (!ct || !reply || !(ct->flags & CT_F_REVNAT) || (ct->flags & CT_F_HAIRPIN))
		return 0;
	int reason = svc_restore(skb, p, ct);
	if (reason)
		return reason;
	frag_remember(p);
	count(skb, REASON_SVC_REVNAT, DIR_TO_POD);
	return 0;
}

/* The forward stage. p is the packet as tern_from_pod parsed it (its addresses may predate
 * a translation: the FIB lookup reads the header as it is now); ct and reply are its
 * conntrack entry and direction when the to-pod stage may have work (NULL for a packet
 * the from-pod stages translated towards a backend: its destination's to-pod has nothing
 * to restore). Returns the program's verdict. */
static __always_inline int forward(struct __sk_buff *skb, const struct pkt *p,
				   const struct ct_value *ct, bool reply)
{
	if (!CFG_FORWARD)
		return TC_ACT_OK;

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;

	/* The ports as they are now (a translation may have changed them since parsing), for
	 * rules that match them. */
	__be16 ports[2] = {};
	if (p->first_frag && p->sport | p->dport)
		bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports));

	/* Zeroed whole, then filled: with a designated initializer clang-14 leaves the unions'
	 * other bytes unwritten, and on Linux 6.18 the helper then read a struct of zeroes
	 * (family 0: -EAFNOSUPPORT on every packet; seen in TestForwardRedirectPeer). */
	struct bpf_fib_lookup fib;
	__builtin_memset(&fib, 0, sizeof(fib));
	fib.family = AF_INET;
	fib.l4_protocol = ip->protocol;
	fib.sport = ports[0];
	fib.dport = ports[1];
	fib.tot_len = 0; /* 0: the kernel checks the skb against the MTU, GSO-aware */
	fib.ifindex = skb->ifindex;
	fib.tos = ip->tos;
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	__be32 daddr = ip->daddr;
	__u8 old_dmac[ETH_ALEN];
	__builtin_memcpy(old_dmac, eth->h_dest, ETH_ALEN);

	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	/* NO_NEIGH still names the device (and the gateway in ipv4_dst). */
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_OK;
	if (fib.ifindex == skb->ifindex)
		return TC_ACT_OK;
	/* Looked up only now: a packet the stack gets anyway does not pay for it. */
	if (bw_limited(skb->ifindex, true))
		return TC_ACT_OK;

	if (CFG_FORWARD & FWD_CFG_PEER) {
		struct endpoint_key k = { .ifindex = fib.ifindex };
		struct endpoint_value *dst = bpf_map_lookup_elem(&tern_endpoints, &k);

		if (dst) {
			/* Only the pod that owns the address, with nothing for its to-pod hook. */
			if (dst->addr != daddr || (dst->flags & EP_F_POLICY) || bw_limited(fib.ifindex, false))
				return TC_ACT_OK;
			__u8 dmac[ETH_ALEN], smac[ETH_ALEN];
			if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
				__builtin_memcpy(dmac, fib.dmac, ETH_ALEN);
				__builtin_memcpy(smac, fib.smac, ETH_ALEN);
			} else {
				if (mac_is_zero(dst->mac))
					return TC_ACT_OK;
				__builtin_memcpy(dmac, dst->mac, ETH_ALEN);
				/* The gateway MAC the source pod used: a router's, never the pod's own. */
				__builtin_memcpy(smac, old_dmac, ETH_ALEN);
			}
			if (!fwd_dec_ttl(skb))
				return TC_ACT_OK;
			int reason = fwd_to_pod_stage(skb, p, ct, reply);
			if (reason)
				return drop(skb, reason, DIR_TO_POD);
			if (!fwd_set_macs(skb, dmac, smac))
				return drop(skb, REASON_DROP_NAT_FAILED, DIR_FROM_POD);
			count(skb, REASON_FWD_PEER, DIR_FROM_POD);
			return bpf_redirect_peer(fib.ifindex, 0);
		}
	}

	if (!(CFG_FORWARD & FWD_CFG_NEIGH))
		return TC_ACT_OK;
	__u32 out = fib.ifindex;
	if (!bpf_map_lookup_elem(&tern_netdevs, &out))
		return TC_ACT_OK;
	/* A reply whose reverse NAT the destination's to-pod would do never leaves the node
	 * (service flows are translated on the client's veth); leave the odd case to the stack. */
	if (ct && reply && (ct->flags & CT_F_REVNAT))
		return TC_ACT_OK;
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (!fwd_dec_ttl(skb))
			return TC_ACT_OK;
		if (!fwd_set_macs(skb, fib.dmac, fib.smac))
			return drop(skb, REASON_DROP_NAT_FAILED, DIR_FROM_POD);
		count(skb, REASON_FWD_NEIGH, DIR_FROM_POD);
		return bpf_redirect(out, 0);
	}
	/* The neighbour (the ENI's gateway) is not resolved: the kernel resolves it and fills
	 * the MACs. The FIB did not check the MTU on this path; bpf_check_mtu does (GSO-aware). */
	__u32 mtu_len = 0;
	if (bpf_check_mtu(skb, out, &mtu_len, 0, 0) != BPF_MTU_CHK_RET_SUCCESS)
		return TC_ACT_OK;
	if (!fwd_dec_ttl(skb))
		return TC_ACT_OK;
	struct bpf_redir_neigh nh;
	__builtin_memset(&nh, 0, sizeof(nh)); /* whole, as fib above */
	nh.nh_family = AF_INET;
	nh.ipv4_nh = fib.ipv4_dst;
	count(skb, REASON_FWD_NEIGH, DIR_FROM_POD);
	return bpf_redirect_neigh(out, &nh, sizeof(nh), 0);
}
