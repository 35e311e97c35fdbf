// Package aliyun is the ENI pool's view of the Alibaba Cloud ECS and VPC OpenAPI: the handful of
// operations the pool needs, behind an interface, implemented over the official Go SDK with rate
// limits, retries with backoff, idempotency tokens, waits for asynchronous ENI states and errors
// mapped to causes the pool can act on.
package aliyun

import (
	"context"
	"net/netip"
)

// Cloud is the seam between the pool and the cloud. Every method is safe for concurrent use.
// Mutating calls that take a token are idempotent for that token: the caller generates it once
// per logical operation (and records it before the call), and reuses it on retry or after a crash.
type Cloud interface {
	// InstanceTypeLimits returns the ENI limits of an instance type.
	InstanceTypeLimits(ctx context.Context, instanceType string) (Limits, error)
	// Instance describes one ECS instance.
	Instance(ctx context.Context, instanceID string) (Instance, error)
	// ListENIs lists ENIs matching every non-empty field of the filter.
	ListENIs(ctx context.Context, f ENIFilter) ([]ENI, error)
	// CreateENI creates an ENI (status Available) with secondary IPs. The token makes a retried
	// create return the same ENI.
	CreateENI(ctx context.Context, req CreateENIRequest) (ENI, error)
	// AttachENI attaches an ENI and waits until it is InUse.
	AttachENI(ctx context.Context, eniID, instanceID string) (ENI, error)
	// DetachENI detaches an ENI and waits until it is Available. Detaching an ENI that is
	// already Available succeeds.
	DetachENI(ctx context.Context, eniID, instanceID string) error
	// DeleteENI deletes an Available ENI and waits until it is gone. Deleting a missing ENI
	// succeeds.
	DeleteENI(ctx context.Context, eniID string) error
	// AssignPrivateIPs adds count (1..MaxIPsPerCall) secondary IPs to an ENI.
	AssignPrivateIPs(ctx context.Context, eniID string, count int, token string) ([]netip.Addr, error)
	// AssignSpecificIPs adds the given addresses (1..MaxIPsPerCall, all of the ENI's vSwitch)
	// to an ENI: AssignPrivateIpAddresses with PrivateIpAddress.N. An address the VPC still
	// has elsewhere is ErrAddressInUse.
	AssignSpecificIPs(ctx context.Context, eniID string, ips []netip.Addr, token string) ([]netip.Addr, error)
	// UnassignPrivateIPs removes secondary IPs (at most MaxIPsPerCall) from an ENI. IPs that are
	// already gone are not an error.
	UnassignPrivateIPs(ctx context.Context, eniID string, ips []netip.Addr) error
	// VSwitches describes vSwitches, including their free address counts.
	VSwitches(ctx context.Context, ids []string) ([]VSwitch, error)
}

// MaxIPsPerCall is the most addresses one Assign/UnassignPrivateIpAddresses call may carry.
const MaxIPsPerCall = 10

// ENI statuses as the API reports them.
const (
	StatusAvailable = "Available"
	StatusAttaching = "Attaching"
	StatusInUse     = "InUse"
	StatusDetaching = "Detaching"
	StatusDeleting  = "Deleting"
)

// ENI types as the API reports them.
const (
	TypePrimary   = "Primary"
	TypeSecondary = "Secondary"
)

// Limits are the ENI limits of an instance type. ENIs counts the primary ENI; IPsPerENI counts
// each ENI's primary address.
type Limits struct {
	InstanceType string
	ENIs         int // EniQuantity
	IPsPerENI    int // EniPrivateIpAddressQuantity
	TotalENIs    int // EniTotalQuantity (adds trunk member ENIs)
	IPv6PerENI   int
	TrunkSupport bool
}

// Instance is what the pool needs to know about its node's ECS instance.
type Instance struct {
	ID             string
	Type           string
	ZoneID         string
	VPCID          string
	VSwitchID      string
	PrimaryIP      netip.Addr
	SecurityGroups []string
}

// ENI is an elastic network interface.
type ENI struct {
	ID         string
	MAC        string
	PrimaryIP  netip.Addr
	Secondary  []netip.Addr // secondary private IPs (the primary excluded)
	VSwitchID  string
	ZoneID     string
	Status     string
	Type       string
	InstanceID string
	Tags       map[string]string
	// TrunkID and VLAN are set for a member ENI attached to a trunk ENI (trunk.go).
	TrunkID string
	VLAN    int
}

// ENIFilter selects ENIs; empty fields do not filter.
type ENIFilter struct {
	IDs        []string
	InstanceID string
	VSwitchID  string
	Status     string
	Tags       map[string]string // all must match
}

// CreateENIRequest describes a new ENI.
type CreateENIRequest struct {
	VSwitchID      string
	SecurityGroups []string
	SecondaryIPs   int // secondary addresses to create the ENI with (0..MaxIPsPerCall)
	Tags           map[string]string
	Name           string
	Description    string
	Token          string // ClientToken; required
	// Trunk creates a trunk ENI (InstanceType=Trunk) instead of a secondary one.
	Trunk bool
}

// VSwitch is a vSwitch with its free address count.
type VSwitch struct {
	ID        string
	ZoneID    string
	CIDR      netip.Prefix
	Available int
}

// Gateway returns the vSwitch gateway: Alibaba Cloud reserves the first address and the last
// three of each vSwitch, and the gateway is the third from the end (x.x.x.253 in a /24).
func Gateway(cidr netip.Prefix) netip.Addr {
	p := cidr.Masked()
	if !p.Addr().Is4() {
		return netip.Addr{}
	}
	a := p.Addr().As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v |= uint32(1)<<(32-p.Bits()) - 1
	v -= 2
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
