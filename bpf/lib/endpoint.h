/* The endpoint registry and the ipcache: which local pod a program serves, and what any
 * address belongs to. Written by the agent (one reconciler each, agent/endpoints), read by
 * the programs that need them: NetworkPolicy (the identity of both ends), bandwidth (the
 * pod's settings) and forwarding (the peer's interface and MAC). */
#pragma once

#include "common.h"

struct endpoint_key {
	__u32 ifindex; /* the pod's host-side veth */
};

enum endpoint_flag {
	EP_F_POLICY = 1 << 0, /* NetworkPolicy enforced on this endpoint */
	EP_F_BANDWIDTH = 1 << 1, /* bandwidth limits in bw_slot apply */
	EP_F_EXCLUSIVE = 1 << 2, /* the pod owns an ENI (its eth0); the veth carries only its
				  * Service and node traffic: flows to remote backends are
				  * translated to the node's address (exclusive.h) */
};

struct endpoint_value {
	__be32 addr;     /* the pod's IPv4 address */
	__u8 mac[6];     /* the pod's eth0 MAC, for redirects into the pod */
	__u16 flags;     /* enum endpoint_flag */
	__u32 identity;  /* numeric identity of the pod's labels (policy); 0 until assigned */
	__u32 bw_slot;   /* index of the pod's bandwidth settings; 0 none */
};

/* tern_endpoints: key endpoint_key (host veth ifindex), value endpoint_value. One entry per
 * local pod; 4096 (far above any node's pod count); never evicted. Writer: agent endpoint
 * reconciler, on attach, detach and restart (from the IPAM allocations and the host veths).
 * Readers: pod programs (one lookup by skb->ifindex), ternctl. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_value);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_endpoints SEC(".maps");

struct ipcache_key {
	__u32 prefixlen; /* LPM: 32 for a pod, less for a CIDR (ipBlock, a node's pod range) */
	__be32 addr;
};

enum ipcache_flag {
	IPC_F_LOCAL = 1 << 0, /* a pod on this node */
	IPC_F_POD = 1 << 1,   /* a pod (on this or another node) */
	IPC_F_EXCLUSIVE = 1 << 2, /* with IPC_F_LOCAL: an exclusive-ENI pod of this node, which
				   * answers only the node's address through its veth
				   * (exclusive.h) */
	IPC_F_POLICY = 1 << 3, /* with IPC_F_LOCAL: NetworkPolicy is enforced on the pod
				* (EP_F_POLICY of its endpoint), for the stages that judge a
				* local backend's ingress away from its veth (policy.h) */
};

struct ipcache_value {
	__u32 identity;   /* numeric identity (policy); 0 unknown */
	__be32 node_addr; /* the node the address lives on; 0 outside the cluster */
	__u16 flags;      /* enum ipcache_flag */
	__u16 pad;
};

/* tern_ipcache: key ipcache_key (address or CIDR), value ipcache_value. LPM trie, 65536
 * prefixes; never evicted. Writer: agent ipcache reconciler (local pods now; every pod of the
 * cluster and every ipBlock with NetworkPolicy). Readers: pod programs (the peer of a flow),
 * netdev programs (a NodePort backend: local, exclusive, its identity), ternctl. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_ipcache SEC(".maps");

static __always_inline struct endpoint_value *endpoint_of(const struct __sk_buff *skb)
{
	struct endpoint_key k = { .ifindex = skb->ifindex };

	return bpf_map_lookup_elem(&tern_endpoints, &k);
}

static __always_inline struct ipcache_value *ipcache_lookup(__be32 addr)
{
	struct ipcache_key k = { .prefixlen = 32, .addr = addr };

	return bpf_map_lookup_elem(&tern_ipcache, &k);
}
