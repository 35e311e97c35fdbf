// Package api is the contract between tern-cni and tern-agent: HTTP+JSON over the agent's
// unix socket, versioned by path (/v1/...). It is a separate package so the CNI binary does
// not link the agent (the cloud SDK, bbolt, the BPF loader).
//
// Every error response carries a CNI error code, so the plugin can hand it to the runtime
// unchanged: 11 means "try again later" (the pool is refilling, the agent is starting), codes
// from 100 up are tern's own.
package api

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"time"
)

// Paths of the v1 API.
const (
	PathAllocate = "/v1/pods/allocate" // POST AllocateRequest → Allocation
	PathLookup   = "/v1/pods/lookup"   // POST PodRef → LookupResponse
	PathRelease  = "/v1/pods/release"  // POST PodRef → ReleaseResponse
	PathAttach   = "/v1/pods/attach"   // POST AttachRequest → AttachResponse
	PathDetach   = "/v1/pods/detach"   // POST AttachRequest → {}
	PathGC       = "/v1/gc"            // POST GCRequest → GCResponse
	PathStatus   = "/v1/status"        // GET → Status
	PathState    = "/v1/state"         // GET → State (tests, ternctl)
	PathReady    = "/v1/readiness"     // GET → Readiness (ternctl status)
	PathPolicy   = "/v1/policy"        // POST PodRef (namespace, name) → PolicyView (ternctl policy get)
	PathReadyz   = "/readyz"           // GET → the metrics listener's /readyz, on the socket too
	PathMetrics  = "/metrics"          // Prometheus text format
)

// CNI error codes (spec 1.1.0 well-known codes, and tern's own from 100).
const (
	CodeInvalidEnv      = 4   // CNI: invalid necessary environment variables
	CodeIOFailure       = 5   // CNI: I/O failure
	CodeDecodeFailure   = 6   // CNI: failed to decode content
	CodeInvalidConfig   = 7   // CNI: invalid network config
	CodeTryAgainLater   = 11  // CNI: try again later
	CodeNotAvailable    = 50  // CNI STATUS: the plugin is not available
	CodeVSwitchExhaust  = 100 // every vSwitch of the node's zone is out of addresses
	CodeNodeFull        = 101 // the node's ENIs hold as many addresses as the instance type allows
	CodeCloudAuth       = 102 // the cloud refused the agent's credentials or permissions
	CodeInternal        = 103 // anything else the agent could not do
	CodeDatapath        = 104 // netlink or BPF setup failed
	CodeUnknownPod      = 105 // CHECK: the agent has no allocation for this sandbox
	CodeIPAMOff         = 106 // tern's IPAM is off (ipam.mode none): tern-cni must run chained
	CodeAgentNotStarted = CodeTryAgainLater
)

// PodRef names one pod sandbox's attachment.
type PodRef struct {
	Namespace   string `json:"namespace"`
	Name        string `json:"name"`
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName,omitempty"`
}

// AllocateRequest asks for an address for a sandbox.
type AllocateRequest struct {
	PodRef
	UID   string `json:"uid,omitempty"`
	NetNS string `json:"netns,omitempty"`
	// Annotations are the pod's annotations as the runtime passes them (the CNI capability
	// io.kubernetes.cri.pod-annotations): they may ask for an exclusive ENI
	// (k8s.aliyun.com/eni) and place it (k8s.aliyun.com/pod-networks).
	Annotations map[string]string `json:"annotations,omitempty"`
}

// ENI describes the ENI that owns a pod address.
type ENI struct {
	ID          string `json:"id"`
	MAC         string `json:"mac"`
	PrimaryIP   string `json:"primaryIP"`
	Gateway     string `json:"gateway"`
	VSwitchID   string `json:"vSwitchID"`
	VSwitchCIDR string `json:"vSwitchCIDR"`
	// NodePrimary: the ENI is the instance's primary NIC (VPC route mode), the node's own
	// interface; the CNI routes pods through it but leaves its addresses alone.
	NodePrimary bool `json:"nodePrimary,omitempty"`
}

// Allocation is a pod address with its ENI.
type Allocation struct {
	IP  string `json:"ip"`
	ENI ENI    `json:"eni"`
	// Kind is the kind of resource: "eniip" (or empty, from older agents) for an address of a
	// shared ENI, "eni" for an exclusive ENI the CNI moves into the pod's namespace.
	Kind string `json:"kind,omitempty"`
	// ViaVeth (kind "eni") are the CIDRs the pod routes through its veth to the node (the
	// Service CIDR, the node's address); everything else leaves through its ENI.
	ViaVeth []string `json:"viaVeth,omitempty"`
	// VLAN and MemberENI (kind "member"): the pod's member ENI and its VLAN id on the trunk
	// ENI, which ENI describes; the CNI wires the pod like an ENIIP pod of the trunk ENI and
	// the agent tags its traffic with the VLAN on the trunk's link.
	VLAN      int    `json:"vlan,omitempty"`
	MemberENI string `json:"memberENI,omitempty"`
}

// Kinds of Allocation.
const (
	KindENIIP  = "eniip"
	KindENI    = "eni"
	KindMember = "member"
)

// LookupResponse says whether a sandbox holds an address.
type LookupResponse struct {
	Found      bool        `json:"found"`
	Allocation *Allocation `json:"allocation,omitempty"`
	// Pod is the allocation's owner (a lookup by container ID alone may find another pod's).
	Pod *PodRef `json:"pod,omitempty"`
}

// ReleaseResponse says what was released (IP empty when the sandbox held nothing).
type ReleaseResponse struct {
	IP string `json:"ip,omitempty"`
}

// AttachRequest asks the agent to attach the pod programs to a host veth in its namespace.
type AttachRequest struct {
	PodRef
	IfIndex int `json:"ifIndex"`
	// IP and MAC are the pod's address and eth0 MAC, recorded in the endpoint registry
	// (attach only; optional for older plugins).
	IP  string `json:"ip,omitempty"`
	MAC string `json:"mac,omitempty"`
	// Chained says the interface was made by another plugin earlier in the conflist (tern's
	// IPAM off, or on): the host veth may have any name. Attach only.
	Chained bool `json:"chained,omitempty"`
	// PortMappings are the sandbox's hostPorts (the CNI portMappings capability). Attach
	// only.
	PortMappings []PortMapping `json:"portMappings,omitempty"`
}

// PortMapping is one hostPort, as the runtime passes it in runtimeConfig.portMappings.
type PortMapping struct {
	HostPort      int    `json:"hostPort"`
	ContainerPort int    `json:"containerPort"`
	Protocol      string `json:"protocol,omitempty"` // tcp (default) or udp
	HostIP        string `json:"hostIP,omitempty"`   // empty: every address of the node
}

// AttachResponse reports how the programs were attached ("tcx" or "clsact").
type AttachResponse struct {
	Mode string `json:"mode"`
}

// GCAttachment is one attachment the runtime still uses (CNI GC's cni.dev/valid-attachments).
type GCAttachment struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
}

// GCRequest lists every attachment still valid; the agent releases the others.
type GCRequest struct {
	ValidAttachments []GCAttachment `json:"validAttachments"`
}

// GCResponse lists what GC released and cleaned in the cloud.
type GCResponse struct {
	Released    []PodRef `json:"released"`
	DeletedENIs []string `json:"deletedENIs,omitempty"`
	AdoptedENIs []string `json:"adoptedENIs,omitempty"`
}

// Status is the agent's readiness, the answer to CNI STATUS.
type Status struct {
	Ready   bool   `json:"ready"`
	Message string `json:"message,omitempty"`
}

// ENIState is one ENI of the pool as the agent sees it.
type ENIState struct {
	ID          string   `json:"id"`
	MAC         string   `json:"mac"`
	PrimaryIP   string   `json:"primaryIP,omitempty"`
	VSwitchID   string   `json:"vSwitchID,omitempty"`
	VSwitchCIDR string   `json:"vSwitchCIDR,omitempty"`
	IPs         []string `json:"ips"`   // every address of the ENI the pool holds (its primary included)
	InUse       []string `json:"inUse"` // those given to pods
}

// PoolLimits are the pool's sizes from eni_conf and the node's quota from its instance type.
type PoolLimits struct {
	InstanceType   string `json:"instanceType,omitempty"`
	MinPoolSize    int    `json:"minPoolSize"`
	MaxPoolSize    int    `json:"maxPoolSize"`
	IdleReclaimSec int    `json:"idleReclaimSeconds,omitempty"` // 0: idle addresses are kept
	ENIQuota       int    `json:"eniQuota"`                     // ENIs usable for pods
	IPsPerENI      int    `json:"ipsPerENI"`
}

// ComponentReadiness is one readiness component of the agent.
type ComponentReadiness struct {
	Name   string    `json:"name"`
	Ready  bool      `json:"ready"`
	Reason string    `json:"reason,omitempty"`
	Since  time.Time `json:"since"`
}

// Readiness is every readiness component, what /readyz summarises.
type Readiness struct {
	Ready      bool                 `json:"ready"`
	Components []ComponentReadiness `json:"components"`
}

// State is the agent's pool and allocations (for tests and ternctl).
type State struct {
	NodeName    string                `json:"nodeName"`
	InstanceID  string                `json:"instanceID"`
	Idle        int                   `json:"idle"`
	InUse       int                   `json:"inUse"`
	MaxPods     int                   `json:"maxPods"`
	Pool        PoolLimits            `json:"pool"`
	ENIs        []ENIState            `json:"enis"`
	Allocations map[string]Allocation `json:"allocations"` // key namespace/name/containerID
	// BandwidthMode is how pod egress limits are enforced: "edt" or "policer".
	BandwidthMode string `json:"bandwidthMode,omitempty"`
}

// PolicyView is what NetworkPolicy does to one pod: `ternctl policy get` (from the agent,
// with names and selectors resolved) and `ternctl bpf policy get` (from the pinned maps).
type PolicyView struct {
	Pod      string `json:"pod,omitempty"` // namespace/name
	Address  string `json:"address,omitempty"`
	Identity uint32 `json:"identity"`
	// Labels of the identity as the compiler saw them (agent only).
	Shape           string `json:"shape,omitempty"`
	IsolatedIngress bool   `json:"isolatedIngress"`
	IsolatedEgress  bool   `json:"isolatedEgress"`
	Audit           bool   `json:"audit"`
	// Enforced: the pod's endpoint has the policy stage on (bpf view only).
	Enforced *bool `json:"enforced,omitempty"`
	// Policies selecting the pod (agent), or named by its map entries (bpf), by name.
	Policies []PolicyOfPod `json:"policies"`
}

// PolicyOfPod is one policy as it applies to a pod.
type PolicyOfPod struct {
	Name string `json:"name"` // namespace/name; "slot N" when the name is unknown
	Slot uint32 `json:"slot"`
	// Isolates lists the directions in which denials are attributed to this policy (the
	// first by name of the policies isolating the pod).
	Isolates []string          `json:"isolates,omitempty"`
	Rules    []PolicyRule      `json:"rules"`
	Counters PolicyCounterPair `json:"counters"`
}

// PolicyRule is one resolved allow entry: a peer and a port block in one direction.
type PolicyRule struct {
	Direction    string `json:"direction"` // ingress, egress
	PeerIdentity uint32 `json:"peerIdentity"`
	// Peer describes the identity: "any", a pod shape's labels (agent) or its addresses
	// (bpf), an ipBlock prefix.
	Peer     string `json:"peer"`
	Protocol string `json:"protocol"` // TCP, UDP, SCTP, or "any" (every protocol and port, ICMP too)
	Ports    string `json:"ports"`    // "8080", "8000-8063", or "any"
}

// PolicyCounterPair is a policy's judged packets in each direction.
type PolicyCounterPair struct {
	Ingress PolicyCounters `json:"ingress"`
	Egress  PolicyCounters `json:"egress"`
}

// PolicyCounters count judged packets: the first packet of each allowed flow, every denied
// one (tern_policy_stats).
type PolicyCounters struct {
	AllowedPackets uint64 `json:"allowedPackets"`
	AllowedBytes   uint64 `json:"allowedBytes"`
	DeniedPackets  uint64 `json:"deniedPackets"`
	DeniedBytes    uint64 `json:"deniedBytes"`
}

// Error is an error response.
type Error struct {
	Code    uint   `json:"code"`
	Msg     string `json:"msg"`
	Details string `json:"details,omitempty"`
}

func (e *Error) Error() string {
	if e.Details == "" {
		return e.Msg
	}
	return e.Msg + ": " + e.Details
}

// HostVethName is the node-side name of a sandbox's veth: "tern" and 11 hex digits of a hash
// of the container ID and interface name. Deriving it lets DEL and GC find the link without
// any state, even when the pod's namespace is gone.
func HostVethName(containerID, ifName string) string {
	if ifName == "" {
		ifName = "eth0"
	}
	h := sha256.Sum256([]byte(fmt.Sprintf("%s/%s", containerID, ifName)))
	return "tern" + hex.EncodeToString(h[:])[:11]
}

// DefaultSocketPath is where the agent listens unless configured otherwise.
const DefaultSocketPath = "/var/run/tern/agent.sock"
