// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Programs on the trunk ENI's link (ENI trunking, bpf/lib/trunk.h), attached first in its
 * tc chains so the netdev programs run after them:
 *
 *   tern_trunk_egress   (tc egress)  a member pod's packet -> tagged with its VLAN id
 *   tern_trunk_ingress  (tc ingress) a tagged frame -> untagged if it is its VLAN pod's */

#include "lib/common.h"
#include "lib/trunk.h"

char __license[] SEC("license") = "Dual BSD/GPL";

SEC("tc")
int tern_trunk_egress(struct __sk_buff *skb)
{
	return trunk_tag(skb);
}

SEC("tc")
int tern_trunk_ingress(struct __sk_buff *skb)
{
	return trunk_untag(skb);
}
