// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Programs on the node's network devices: the primary NIC and every ENI link.
 *
 *   tern_from_netdev  (tc ingress: what arrives from the VPC)
 *       parse -> count -> pass
 *       (to come: conntrack -> NodePort translation, masquerade reply restore -> forward)
 *   tern_to_netdev    (tc egress: what leaves for the VPC)
 *       parse -> count -> pass
 *       (to come: conntrack -> masquerade of pod traffic leaving the VPC, NodePort reply)
 *
 * Today they leave every packet untouched and count the IPv4 ones, so the hook is attached
 * and proven on every node before NodePort and masquerade stages are added between parse
 * and pass. Malformed IPv4 is counted and passed too: on a NIC the stack, not tern, is the
 * judge of traffic tern does not translate. Maps come from the shared headers and are
 * pinned by name, so this object and the pod object write the same tern_metrics. */

#include "lib/common.h"
#include "lib/metrics.h"
#include "lib/parse.h"

char __license[] SEC("license") = "Dual BSD/GPL";

static __always_inline int netdev_pass(struct __sk_buff *skb, __u8 dir)
{
	struct pkt p;

	if (parse_packet(skb, &p) == PARSE_NOT_IPV4)
		return TC_ACT_OK;
	count(skb, REASON_PASS, dir);
	return TC_ACT_OK;
}

SEC("tc")
int tern_from_netdev(struct __sk_buff *skb)
{
	return netdev_pass(skb, DIR_FROM_NETDEV);
}

SEC("tc")
int tern_to_netdev(struct __sk_buff *skb)
{
	return netdev_pass(skb, DIR_TO_NETDEV);
}
