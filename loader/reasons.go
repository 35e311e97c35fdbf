package loader

import (
	"slices"
	"strings"
)

// Reason is a datapath verdict reason (enum tern_reason in bpf/lib/metrics.h). Its values
// and names are generated from the object's BTF, so Go cannot drift from C.
type Reason = PodTernReason

// Direction is enum tern_dir: which program counted the packet (pod veth or netdev).
type Direction = PodTernDir

const (
	DirFromPod = PodTernDirDIR_FROM_POD
	DirToPod   = PodTernDirDIR_TO_POD
	// DirFromNetdev and DirToNetdev count what the netdev programs saw arrive on and leave
	// through an ENI link or the primary NIC.
	DirFromNetdev = PodTernDirDIR_FROM_NETDEV
	DirToNetdev   = PodTernDirDIR_TO_NETDEV
	// DirSock counts the socket hooks' calls (bpf/sock.c): packets are calls, bytes are 0.
	DirSock = PodTernDirDIR_SOCK

	ReasonPass             = PodTernReasonREASON_PASS
	ReasonSvcForward       = PodTernReasonREASON_SVC_FORWARD
	ReasonSvcRevNAT        = PodTernReasonREASON_SVC_REVNAT
	ReasonSvcHairpin       = PodTernReasonREASON_SVC_HAIRPIN
	ReasonSvcReject        = PodTernReasonREASON_SVC_REJECT
	ReasonSvcPortSNAT      = PodTernReasonREASON_SVC_PORT_SNAT
	ReasonDropTruncated    = PodTernReasonREASON_DROP_TRUNCATED
	ReasonDropBadIP        = PodTernReasonREASON_DROP_BAD_IP
	ReasonDropCTFull       = PodTernReasonREASON_DROP_CT_FULL
	ReasonDropNATFailed    = PodTernReasonREASON_DROP_NAT_FAILED
	ReasonDropRejectFailed = PodTernReasonREASON_DROP_REJECT_FAILED
	ReasonDropNoBackend    = PodTernReasonREASON_DROP_NO_BACKEND_SLOT
	ReasonDropSCTPPort     = PodTernReasonREASON_DROP_SCTP_PORT
	ReasonDropCTCollision  = PodTernReasonREASON_DROP_CT_COLLISION
	ReasonSockConnect      = PodTernReasonREASON_SOCK_CONNECT
	ReasonSockSendmsg      = PodTernReasonREASON_SOCK_SENDMSG
	ReasonSockRevNAT       = PodTernReasonREASON_SOCK_REVNAT
	ReasonSockReject       = PodTernReasonREASON_SOCK_REJECT
	ReasonSockRevNATFull   = PodTernReasonREASON_SOCK_REVNAT_FULL
	ReasonSockDestroy      = PodTernReasonREASON_SOCK_DESTROY
	// ReasonDropNoLocalBackend: a frontend with internalTrafficPolicy Local has endpoints,
	// none on this node; kube-proxy drops such packets (it rejects only when there are none).
	ReasonDropNoLocalBackend = PodTernReasonREASON_DROP_NO_LOCAL_BACKEND
	// ReasonFwdPeer and ReasonFwdNeigh count packets the forward stage redirected: into a
	// pod on this node, out of an ENI or the primary NIC (bpf/lib/forward.h).
	ReasonFwdPeer  = PodTernReasonREASON_FWD_PEER
	ReasonFwdNeigh = PodTernReasonREASON_FWD_NEIGH
	// The bandwidth manager (bpf/lib/bandwidth.h): a packet over its pod's limit dropped by
	// the token-bucket policer, one whose EDT departure lay beyond the horizon, and one
	// given a later departure time (passed, paced by fq).
	ReasonDropBWPoliced  = PodTernReasonREASON_DROP_BW_POLICED
	ReasonDropBWHorizon  = PodTernReasonREASON_DROP_BW_HORIZON
	ReasonBWPaced        = PodTernReasonREASON_BW_PACED
	ReasonDropPolicy     = PodTernReasonREASON_DROP_POLICY
	ReasonPolicyAudit    = PodTernReasonREASON_POLICY_AUDIT
	ReasonMasq           = PodTernReasonREASON_MASQ
	ReasonMasqRestore    = PodTernReasonREASON_MASQ_RESTORE
	ReasonDropSNATNoPort = PodTernReasonREASON_DROP_SNAT_NO_PORT
	ReasonDropSNATFull   = PodTernReasonREASON_DROP_SNAT_FULL
	// External frontends on the netdevs (bpf/lib/nodeport.h): an external client's packet
	// translated to a local backend (DNAT) or a remote one (DNAT + SNAT to the node), a
	// reply restored to it, a client outside loadBalancerSourceRanges, and a translated
	// packet with no route.
	ReasonNodePortForward     = PodTernReasonREASON_NODEPORT_FORWARD
	ReasonNodePortSNAT        = PodTernReasonREASON_NODEPORT_SNAT
	ReasonNodePortRevNAT      = PodTernReasonREASON_NODEPORT_REVNAT
	ReasonDropSrcRange        = PodTernReasonREASON_DROP_SRC_RANGE
	ReasonDropNodePortNoRoute = PodTernReasonREASON_DROP_NODEPORT_NO_ROUTE
	// ReasonPolicyAllowed names an allowed verdict on tern_events (policy_event); it is
	// never counted in tern_metrics (tern_policy_stats counts verdicts per policy).
	ReasonPolicyAllowed = PodTernReasonREASON_POLICY_ALLOWED
	// ReasonCTReplyLost counts (to-pod, and from-pod where a backend's reply leaves it) a
	// TCP segment with ACK, not a RST, that found no conntrack entry: the LRU evicted its
	// live flow's entry, and a service flow's reply (a SYN-ACK, the server's first data)
	// then reaches the client untranslated. Not a drop: the packet passes as it is.
	ReasonCTReplyLost = PodTernReasonREASON_CT_REPLY_LOST
	// ReasonCTCollisionLate counts (from-pod) a packet of an idle service flow whose wire
	// tuple a newer flow of the same client took after the LRU had evicted the idle flow's
	// REVNAT half: a TCP segment is answered with a RST (the backend knows the newer
	// connection only), a SYN or UDP datagram opens a new flow on another source port.
	ReasonCTCollisionLate = PodTernReasonREASON_CT_COLLISION_LATE
	// ReasonSockMaglev counts (sock) connect()/sendmsg() calls to a Maglev frontend whose
	// backend the Maglev table chose, the socket's source address and port being known;
	// ReasonSockDefer those to a frontend with loadBalancerSourceRanges whose client address
	// was not known yet (a pod's unbound socket), left untranslated for the tc path to check.
	ReasonSockMaglev = PodTernReasonREASON_SOCK_MAGLEV
	ReasonSockDefer  = PodTernReasonREASON_SOCK_DEFER
	// ReasonSvcICMPError counts (to-pod) ICMP errors about a pod's service flow (a
	// backend's port unreachable, a router's fragmentation needed) whose quoted header was
	// turned back to the frontend, so that the client's socket hears them.
	ReasonSvcICMPError = PodTernReasonREASON_SVC_ICMP_ERROR
)

var reasonLabels = map[Reason]string{
	ReasonPass: "pass", ReasonSvcForward: "svc_forward", ReasonSvcRevNAT: "svc_revnat",
	ReasonSvcHairpin: "svc_hairpin", ReasonSvcReject: "svc_reject",
	ReasonDropTruncated: "drop_truncated", ReasonDropBadIP: "drop_bad_ip",
	ReasonSvcPortSNAT: "svc_port_snat", ReasonDropCTFull: "drop_ct_full",
	ReasonDropNATFailed: "drop_nat_failed", ReasonDropRejectFailed: "drop_reject_failed",
	ReasonDropNoBackend: "drop_no_backend_slot", ReasonDropSCTPPort: "drop_sctp_port",
	ReasonDropCTCollision: "drop_ct_collision",
	ReasonSockConnect:     "sock_connect", ReasonSockSendmsg: "sock_sendmsg", ReasonSockRevNAT: "sock_revnat",
	ReasonSockReject: "sock_reject", ReasonSockRevNATFull: "sock_revnat_full", ReasonSockDestroy: "sock_destroy",
	ReasonDropNoLocalBackend: "drop_no_local_backend",
	ReasonFwdPeer:            "fwd_peer", ReasonFwdNeigh: "fwd_neigh",
	ReasonDropBWPoliced: "drop_bw_policed", ReasonDropBWHorizon: "drop_bw_horizon",
	ReasonBWPaced:    "bw_paced",
	ReasonDropPolicy: "drop_policy", ReasonPolicyAudit: "policy_audit",
	ReasonMasq: "masq", ReasonMasqRestore: "masq_restore",
	ReasonDropSNATNoPort: "drop_snat_no_port", ReasonDropSNATFull: "drop_snat_full",
	ReasonNodePortForward: "nodeport_forward", ReasonNodePortSNAT: "nodeport_snat",
	ReasonNodePortRevNAT: "nodeport_revnat", ReasonDropSrcRange: "drop_src_range",
	ReasonDropNodePortNoRoute: "drop_nodeport_no_route",
	ReasonPolicyAllowed:       "policy_allowed",
	ReasonCTReplyLost:         "ct_reply_lost",
	ReasonCTCollisionLate:     "ct_collision_late",
	ReasonSockMaglev:          "sock_maglev",
	ReasonSockDefer:           "sock_defer",
	ReasonSvcICMPError:        "svc_icmp_error",
}

// String is the reason's Prometheus label value.
func (r PodTernReason) String() string {
	if n, ok := reasonLabels[r]; ok {
		return n
	}
	return "unknown"
}

// IsDrop tells whether packets counted under r were dropped.
func (r PodTernReason) IsDrop() bool {
	return strings.HasPrefix(r.String(), "drop_")
}

func (d PodTernDir) String() string {
	switch d {
	case DirFromPod:
		return "from-pod"
	case DirToPod:
		return "to-pod"
	case DirFromNetdev:
		return "from-netdev"
	case DirToNetdev:
		return "to-netdev"
	case DirSock:
		return "sock"
	}
	return "unknown"
}

// DropEvent is one event of the tern_events ring buffer (struct drop_event in
// bpf/lib/metrics.h); EventLimit is a CPU's rate limiter with its lost-event counts.
type (
	DropEvent  = PodDropEvent
	EventLimit = PodEventLimit
	// PolicyEvent is a policy verdict (struct policy_event in bpf/lib/policy.h): a
	// DropEvent of kind EventKindPolicy followed by what was judged.
	PolicyEvent = PodPolicyEvent
)

// Event kinds (enum event_kind in bpf/lib/metrics.h): DropEvent.Kind.
const (
	EventKindDrop   = 0
	EventKindPolicy = 1
)

// Reasons lists every reason with a label, in numeric order (for ternctl's filters).
func Reasons() []Reason {
	out := make([]Reason, 0, len(reasonLabels))
	for r := range reasonLabels {
		out = append(out, r)
	}
	slices.Sort(out)
	return out
}
