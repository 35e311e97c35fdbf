/* 802.1Q helpers shared by the two sides of ENI trunking: the node's trunk programs
 * (lib/trunk.h: tag a member pod's packets, untag its VLAN's frames) and the emulated VPC's
 * (test/ecsemu/vlanbpf/bpf/vpc_vlan.c: tag frames for a member, check a member's tag). The two
 * sides keep their own maps and verdicts — the node trusts its own pods and guards delivery,
 * the VPC checks the sender — so only the frame handling is shared. Depends on vmlinux.h and
 * the libbpf headers alone, so the emulator's object can include it without lib/common.h.
 *
 * tc sees only hardware-accelerated tags (skb->vlan_present / vlan_tci): the receive path
 * moves an in-band tag out of the frame before tc, and bpf_skb_vlan_push sets an accelerated
 * one, so the Ethernet header stays as it was and the IPv4 header follows it directly. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef ETH_P_IP
#define ETH_P_IP 0x0800
#endif
#define ETH_P_8021Q 0x8100
#define VLAN_VID_MASK 0x0fff

/* vlan_ipv4_addr reads the IPv4 source (src) or destination of a frame; false when it is not
 * IPv4 or too short. */
static __always_inline bool vlan_ipv4_addr(struct __sk_buff *skb, bool src, __u32 *addr)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return false;
	*addr = src ? ip->saddr : ip->daddr;
	return true;
}

/* vlan_id is the frame's VLAN id, 0 when it carries no tag. */
static __always_inline __u32 vlan_id(const struct __sk_buff *skb)
{
	return skb->vlan_present ? (skb->vlan_tci & VLAN_VID_MASK) : 0;
}

/* vlan_tag gives the frame an 802.1Q tag with vid; non-zero when the helper failed. */
static __always_inline long vlan_tag(struct __sk_buff *skb, __u16 vid)
{
	return bpf_skb_vlan_push(skb, bpf_htons(ETH_P_8021Q), vid);
}

/* vlan_untag removes the frame's tag, if it has one; non-zero when the helper failed. */
static __always_inline long vlan_untag(struct __sk_buff *skb)
{
	return skb->vlan_present ? bpf_skb_vlan_pop(skb) : 0;
}
