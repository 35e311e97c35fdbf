// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The emulated VPC's side of ENI trunking, on the trunk ENI's VPC-side veth:
 *
 *   vpc_vlan_to_node    (tc egress: VPC -> instance) a frame for a member ENI's address is
 *                       tagged with the member's VLAN id.
 *   vpc_vlan_from_node  (tc ingress: instance -> VPC) a tagged frame passes (untagged) only
 *                       from an address of the member that owns that VLAN on this trunk; an
 *                       untagged frame from a member's address is dropped. This is the VPC's
 *                       source check for members: the VLAN tells which ENI sent the frame.
 *
 * Everything else (the trunk ENI's own addresses) passes untouched. */

#include "lib/vlan.h" /* shared with the node's trunk programs (bpf/lib/trunk.h) */

#define TC_ACT_OK 0
#define TC_ACT_SHOT 2

char __license[] SEC("license") = "Dual BSD/GPL";

struct member {
	__u32 ifindex; /* the trunk's VPC-side veth */
	__u32 vid;
};

/* vpc_members: key a member ENI's IPv4 address (network order), value struct member; 4096;
 * written by the emulator's SDN (attach, detach, assign, unassign), read by both programs. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct member);
	__uint(max_entries, 4096);
} vpc_members SEC(".maps");

SEC("tc")
int vpc_vlan_to_node(struct __sk_buff *skb)
{
	__u32 dst;

	if (skb->vlan_present || !vlan_ipv4_addr(skb, false, &dst))
		return TC_ACT_OK;
	struct member *m = bpf_map_lookup_elem(&vpc_members, &dst);

	if (!m || m->ifindex != skb->ifindex)
		return TC_ACT_OK;
	if (vlan_tag(skb, m->vid))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

SEC("tc")
int vpc_vlan_from_node(struct __sk_buff *skb)
{
	__u32 src;
	__u32 vid = vlan_id(skb);

	if (vid && bpf_skb_vlan_pop(skb))
		return TC_ACT_SHOT;
	if (!vlan_ipv4_addr(skb, true, &src))
		return vid ? TC_ACT_SHOT : TC_ACT_OK;
	struct member *m = bpf_map_lookup_elem(&vpc_members, &src);

	if (!m)
		return vid ? TC_ACT_SHOT : TC_ACT_OK; /* a tag on the trunk's own traffic */
	if (m->ifindex != skb->ifindex || m->vid != vid)
		return TC_ACT_SHOT; /* a member's address without its VLAN, or on another's */
	return TC_ACT_OK;
}
