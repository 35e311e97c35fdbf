/* Service flows of exclusive-ENI pods, as clients and as backends (tern_from_pod,
 * tern_from_netdev).
 *
 * An exclusive-ENI pod sends Service traffic through its veth (veth1) to the node, where
 * tern_from_pod translates it, but every other packet of the pod uses its own ENI: a
 * backend's reply to the pod's address is delivered by the VPC straight to that ENI, past
 * the node that holds the flow's translation, and the pod drops it (it never sent anything
 * to the backend's address). An ENIIP backend on the pod's own node replies through the
 * node and is restored there as usual.
 *
 * So a new service flow of such a pod (EP_F_EXCLUSIVE in tern_endpoints) whose chosen
 * backend is not on this node (tern_ipcache has no IPC_F_LOCAL for it) is translated like
 * an external client's NodePort flow to a remote backend (nodeport.h): DNAT to the backend
 * and SNAT to CFG_NODEPORT_ADDR, with a port claimed in tern_nodeport_snat (portclaim.h).
 * The backend sees the node's address, as it would behind kube-proxy; its reply comes to the
 * node's primary NIC, where tern_from_netdev (np_snat_restore) restores frontend -> pod and
 * sends it where the FIB routes the pod's address: the host end of the pod's veth.
 * TCP and UDP only (SCTP flows keep the DNAT-only path); without CFG_NODEPORT_ADDR (the
 * netdev path of external frontends off) nothing changes.
 *
 * The same holds for an exclusive-ENI pod as a backend: it answers every client but the
 * node from its ENI, so a client whose flow the node translated (another exclusive pod of the
 * node, itself through a Service, an external client through a NodePort) would get the
 * answer untranslated, past the node, or not at all. A flow to a backend that tern_ipcache
 * marks IPC_F_EXCLUSIVE (a local exclusive pod) is therefore also translated to the node's
 * address, by the client's tern_from_pod when the client is an exclusive pod and by
 * tern_from_netdev (np_open) for an external client; the backend's reply, addressed to the
 * node, goes through its veth, and its tern_from_pod restores it (excl_backend_reply: the
 * reverse entry in tern_nodeport_snat) and sends it where the FIB routes the client. An
 * ENIIP pod's flow to such a backend stays DNAT only: the backend's answer to the pod's
 * address crosses the VPC to the node's ENI and reaches the client's veth, where tern_to_pod
 * restores it as for any backend on another node.
 *
 * The stages share tern_from_pod's one service path (service_forward): the open and the
 * established step differ (np_open_snat / np_refresh instead of svc_open_to /
 * svc_keep_pair), policy and the destination rewrite are the same, and the packet leaves by
 * the FIB (np_redirect) instead of the forward stage: the stack would drop a packet from one
 * of the node's own addresses arriving on a veth. Separate tails for the SNAT flows made the
 * verifier process 20-50 % more instructions (docs/reliability.md). */
#pragma once

#include "common.h"
#include "conntrack.h"
#include "endpoint.h"
#include "lb.h"
#include "metrics.h"
#include "nat.h"
#include "nodeport.h"
#include "svc.h"

/* Whether a new service flow of p to be leaves the node with the node's address. */
static __always_inline bool excl_wants_snat(const struct __sk_buff *skb, const struct pkt *p,
					    const struct backend_value *be)
{
	if (!CFG_NODEPORT_ADDR || (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP))
		return false;
	struct endpoint_value *ep = endpoint_of(skb);
	if (!ep || !(ep->flags & EP_F_EXCLUSIVE))
		return false;
	/* A backend on this node answers through the node unless it is exclusive too. */
	struct ipcache_value *peer = ipcache_lookup(be->addr);
	return !peer || (peer->flags & (IPC_F_LOCAL | IPC_F_EXCLUSIVE)) != IPC_F_LOCAL;
}

/* A packet a pod sends through its veth to the node's address (p, parsed): when the pod is
 * exclusive, the reply of a flow translated to it (see above) is restored to frontend ->
 * client (0, or a drop reason); NP_NOT_MINE for any other packet. The caller counts it and
 * sends it where the FIB routes the client (np_snat_reply_out). A global function: the
 * verifier checks it once on its own; inlined into tern_from_pod, whose later stages every
 * packet it does not take goes on to, it tripled that program's verification
 * (docs/reliability.md). */
__attribute__((noinline)) int excl_backend_reply(struct __sk_buff *skb, const struct pkt *p, __u64 now)
{
	if (!skb || !p || !p->first_frag || (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP))
		return NP_NOT_MINE;
	struct endpoint_value *ep = endpoint_of(skb);
	if (!ep || !(ep->flags & EP_F_EXCLUSIVE))
		return NP_NOT_MINE;
	/* tern_to_pod tracked the translated packets coming in as a flow of the pod's: its
	 * entry hears the replies too, so it follows the connection's state and lifetime. */
	struct flow f;
	flow_lookup(p, now, &f);
	int r = np_snat_restore(skb, p, now);
	if (r != NP_NOT_MINE && f.ct)
		ct_touch(f.ct, now, p->proto, p->tcp_flags, ct_is_reply(f.ct, f.from_a));
	return r;
}

/* A client's packet on an established SNAT flow (f->ct has CT_F_SNAT): refresh both halves
 * and return 0 with the flow in *out, or SVC_REPICK when it must be opened again (its
 * backend left, a new TCP connection on the tuple, or its reverse entry is gone). */
static __always_inline int excl_established(const struct pkt *p, struct flow *f, __u64 now,
					    struct ct_value *out)
{
	struct ct_value *ct = f->ct;

	if (svc_must_repick(ct, p))
		return SVC_REPICK;
	ct_touch(ct, now, p->proto, p->tcp_flags, false);
	if (!np_refresh(p, ct, now))
		return SVC_REPICK;
	*out = *ct;
	return 0;
}

