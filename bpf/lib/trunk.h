/* ENI trunking on the node: a member ENI's pod has no device of its own; its frames travel
 * over the trunk ENI's link tagged with the member's VLAN id (the id the cloud gave the
 * member, Attachment.DeviceIndex). The kernel here has no VLAN devices and no act_vlan, so
 * two small programs do the tagging with the bpf_skb_vlan_push/pop helpers, first in the
 * trunk link's tc chains (before the netdev programs, which then see plain IPv4):
 *
 *   trunk_tag    (egress)  a packet whose source is a member pod's address leaves tagged
 *                          with that member's VLAN id; everything else passes untouched.
 *   trunk_untag  (ingress) a tagged frame must carry a VLAN id of this trunk and be for the
 *                          pod of that VLAN: the tag is popped and the stack routes it to the
 *                          pod ("to podIP -> main"). Anything else tagged is dropped: one
 *                          member's VLAN never reaches another pod.
 *
 * Both return TC_ACT_UNSPEC (-1) to go on: TCX_NEXT under tcx, "next filter" under clsact,
 * so the netdev programs run after them in either mode. */
#pragma once

#include "common.h"
#include "vlan.h"

#define TRUNK_NEXT TC_ACT_UNSPEC

/* A member pod's tag: the trunk link it leaves through and its VLAN id. */
struct trunk_vlan {
	__u32 ifindex;
	__u16 vid;
	__u16 flags; /* reserved, 0 */
};

/* A VLAN of one trunk link. */
struct trunk_key {
	__u32 ifindex;
	__u32 vid;
};

enum trunk_stat {
	TRUNK_TAGGED = 0,	   /* egress: tag pushed */
	TRUNK_UNTAGGED = 1,	   /* ingress: tag popped, passed to the stack */
	TRUNK_DROP_UNKNOWN_VLAN = 2, /* ingress: a VLAN id no member of this trunk has */
	TRUNK_DROP_WRONG_DST = 3,  /* ingress: a VLAN's frame not for that VLAN's pod */
	TRUNK_DROP_PUSH = 4,	   /* egress: the helper failed */
	TRUNK_STAT_MAX = 5,
};

/* tern_trunk_vlans: key a member pod's IPv4 address (__u32, network order), value struct
 * trunk_vlan; 4096 entries (a node's member ENIs are tens, bounded by EniTotalQuantity);
 * never evicted. Writer: datapath.Trunk (the agent's attach of a member pod, its release and
 * GC; SetupPod/TeardownPod in tests). Reader: trunk_tag. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct trunk_vlan);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_trunk_vlans SEC(".maps");

/* tern_trunk_pods: key struct trunk_key (trunk link ifindex, VLAN id), value the member pod's
 * IPv4 address (__u32, network order); 4096; never evicted. Writer: datapath.Trunk, with
 * tern_trunk_vlans. Reader: trunk_untag. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct trunk_key);
	__type(value, __u32);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_trunk_pods SEC(".maps");

/* tern_trunk_stats: per-CPU array, key enum trunk_stat, value packets (__u64); 5 entries.
 * Writer: both trunk programs. Reader: datapath.Trunk.Stats (tests). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, TRUNK_STAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_trunk_stats SEC(".maps");

static __always_inline void trunk_count(__u32 stat)
{
	__u64 *v = bpf_map_lookup_elem(&tern_trunk_stats, &stat);

	if (v)
		*v += 1;
}

static __always_inline int trunk_tag(struct __sk_buff *skb)
{
	__u32 src;

	if (skb->vlan_present || !vlan_ipv4_addr(skb, true, &src))
		return TRUNK_NEXT;
	struct trunk_vlan *v = bpf_map_lookup_elem(&tern_trunk_vlans, &src);

	if (!v || v->ifindex != skb->ifindex)
		return TRUNK_NEXT;
	if (vlan_tag(skb, v->vid)) {
		trunk_count(TRUNK_DROP_PUSH);
		return TC_ACT_SHOT;
	}
	trunk_count(TRUNK_TAGGED);
	return TRUNK_NEXT;
}

static __always_inline int trunk_untag(struct __sk_buff *skb)
{
	if (!skb->vlan_present)
		return TRUNK_NEXT;
	struct trunk_key k = { .ifindex = skb->ifindex, .vid = vlan_id(skb) };
	__u32 *pod = bpf_map_lookup_elem(&tern_trunk_pods, &k);

	if (!pod) {
		trunk_count(TRUNK_DROP_UNKNOWN_VLAN);
		return TC_ACT_SHOT;
	}
	__u32 want = *pod, dst;

	if (bpf_skb_vlan_pop(skb) || !vlan_ipv4_addr(skb, false, &dst) || dst != want) {
		trunk_count(TRUNK_DROP_WRONG_DST);
		return TC_ACT_SHOT;
	}
	trunk_count(TRUNK_UNTAGGED);
	return TRUNK_NEXT;
}
