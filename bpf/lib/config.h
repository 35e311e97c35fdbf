/* Load-time configuration. The loader sets these read-only globals before the programs are
 * loaded (cilium/ebpf rewrites .rodata), so the verifier sees them as constants and dead
 * branches are pruned. Defaults here are what a test gets when it sets nothing. */
#pragma once

#include "common.h"

/* Source address used to masquerade hairpin traffic (a pod reaching itself through a
 * Service): without it the pod would receive a packet from its own address and drop it as
 * a martian. Network byte order. Default 169.254.42.1, as Cilium uses. */
volatile const __be32 CFG_HAIRPIN_IP = bpf_htonl(0xa9fe2a01);

/* Conntrack lifetimes, in seconds. TCP flows move from SYN to established when a reply is
 * seen, and to closing on FIN or RST. */
volatile const __u32 CFG_CT_TCP_SYN_TIMEOUT = 60;
volatile const __u32 CFG_CT_TCP_ESTABLISHED_TIMEOUT = 21600;
volatile const __u32 CFG_CT_TCP_CLOSING_TIMEOUT = 10;
volatile const __u32 CFG_CT_UDP_TIMEOUT = 60;

/* Source ports for a service flow whose translated tuple (client:port -> backend) is already
 * another live flow's: the client reused its port towards another frontend that landed on
 * the same backend. The flow gets a free port from this range on the wire, and its replies
 * get the client's port back. Default 61000-65535, above Linux's default ephemeral range
 * (32768-60999), so it does not compete with the client's own sockets. */
volatile const __u16 CFG_COLLISION_PORT_MIN = 61000;
volatile const __u16 CFG_COLLISION_PORT_COUNT = 4536;
