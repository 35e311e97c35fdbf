// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Programs on the node's network devices: the primary NIC and every ENI link.
 *
 *   tern_from_netdev  (tc ingress: what arrives from the VPC)
 *       parse -> masquerade reply restore (snat.h)
 *             -> external frontends (nodeport.h): a SNAT flow's reply, or a client's packet
 *                to a NodePort / LoadBalancer IP / externalIP translated to its backend
 *             -> pass
 *   tern_to_netdev    (tc egress: what leaves for the VPC)
 *       parse -> a local backend's reply to an external client restored (nodeport.h)
 *             -> conntrack + masquerade of pod traffic leaving the VPC (snat.h)
 *             -> out of the masquerade address's interface, or pass
 *
 * Packets that are not masquerade traffic are left untouched and counted under pass.
 * Malformed IPv4 is counted and passed too: on a NIC the stack, not tern, is the judge of
 * traffic tern does not translate. Maps come from the shared headers and are pinned by
 * name, so this object and the pod object share tern_metrics, tern_conntrack and the rest. */

#include "lib/common.h"
#include "lib/metrics.h"
#include "lib/parse.h"
#include "lib/conntrack.h"
#include "lib/endpoint.h"
#include "lib/nat.h"
#include "lib/snat.h"
#include "lib/svc.h"
#include "lib/nodeport.h"
#include "lib/vlan.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* A stage's outcome (SNAT_PASS, SNAT_DONE or a drop reason) as the program's verdict. */
static __always_inline int netdev_verdict(struct __sk_buff *skb, int r, __u8 done_reason, __u8 dir)
{
	if (r == SNAT_PASS) {
		count(skb, REASON_PASS, dir);
		return TC_ACT_OK;
	}
	if (r != SNAT_DONE)
		return drop(skb, r, dir);
	count(skb, done_reason, dir);
	return TC_ACT_OK;
}

SEC("tc")
int tern_from_netdev(struct __sk_buff *skb)
{
	struct pkt p;

	int parsed = parse_packet(skb, &p);

	if (parsed == PARSE_NOT_IPV4)
		return TC_ACT_OK;
	if (parsed != PARSE_OK)
		return netdev_verdict(skb, SNAT_PASS, 0, DIR_FROM_NETDEV);
	__u64 now = ct_now();
	int r = snat_ingress(skb, &p, now);
	if (r == SNAT_PASS) {
		int v = np_from_netdev(skb, &p, now);
		if (v != NP_NOT_MINE)
			return v;
	}
	return netdev_verdict(skb, r, REASON_MASQ_RESTORE, DIR_FROM_NETDEV);
}

/* A packet whose source the netdev egress translated (masquerade to the node's address, or a
 * local backend's reply restored to its frontend) leaves untagged. A pod's packet is tagged
 * here only by tern_trunk_egress, which runs first on a trunk ENI's link and tags a member
 * pod's packets with the member's VLAN (lib/trunk.h); that tag says "from the member's
 * address", which is no longer the source: the VPC would drop the frame (the member's VLAN
 * with another source), and the primary NIC, where masqueraded packets go, has no VLANs. */
static __always_inline int netdev_untag_translated(struct __sk_buff *skb, int verdict)
{
	if (verdict != TC_ACT_SHOT && vlan_untag(skb))
		return drop(skb, REASON_DROP_NAT_FAILED, DIR_TO_NETDEV); /* the helper failed */
	return verdict;
}

SEC("tc")
int tern_to_netdev(struct __sk_buff *skb)
{
	struct pkt p;

	int parsed = parse_packet(skb, &p);

	if (parsed == PARSE_NOT_IPV4)
		return TC_ACT_OK;
	if (parsed != PARSE_OK)
		return netdev_verdict(skb, SNAT_PASS, 0, DIR_TO_NETDEV);
	__u64 now = ct_now();
	int v = np_to_netdev(skb, &p, now);
	if (v != NP_NOT_MINE)
		return netdev_untag_translated(skb, v);
	int r = snat_egress(skb, &p, now);
	int verdict = netdev_verdict(skb, r, REASON_MASQ, DIR_TO_NETDEV);
	if (r != SNAT_DONE)
		return verdict;
	verdict = netdev_untag_translated(skb, verdict);
	/* The masquerade address lives on one interface (the primary NIC): the VPC refuses it
	 * as the source of another ENI's packets, so a pod's translated packet leaves there. */
	if (verdict != TC_ACT_SHOT && CFG_MASQ_IFINDEX && skb->ifindex != CFG_MASQ_IFINDEX)
		return bpf_redirect_neigh(CFG_MASQ_IFINDEX, NULL, 0, 0);
	return verdict;
}
