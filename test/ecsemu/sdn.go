package ecsemu

import (
	"net"
	"net/netip"
)

// ENIInfo is what the SDN side needs to know about one ENI: where it plugs in, its MAC, and
// the addresses the VPC must route to it. IPs[0] is the ENI's primary address.
type ENIInfo struct {
	ID          string
	InstanceID  string
	MAC         net.HardwareAddr
	Primary     bool // the instance's primary ENI: becomes eth0, configured with a default route
	DeviceIndex int  // the guest sees the ENI as eth<DeviceIndex>
	VSwitchCIDR netip.Prefix
	Gateway     netip.Addr
	IPs         []netip.Addr
	// A member ENI has no link of its own: its frames travel over its trunk ENI's link tagged
	// with VLAN. TrunkID, TrunkMAC and VLAN are set only for a member ENI.
	TrunkID  string
	TrunkMAC net.HardwareAddr
	VLAN     int
}

// SDN is the data-plane half of the emulator: what the cloud's virtual network does when the
// API attaches an ENI or assigns an address. The API logic calls it with its state lock held,
// so calls arrive one at a time and in the order the state changed.
type SDN interface {
	// AttachENI plugs the ENI into the instance and routes all of eni.IPs to it.
	AttachENI(eni ENIInfo) error
	// DetachENI unplugs the ENI and drops its routes.
	DetachENI(eni ENIInfo) error
	// AssignIP routes ip to an attached ENI.
	AssignIP(eni ENIInfo, ip netip.Addr) error
	// UnassignIP stops routing ip to the ENI.
	UnassignIP(eni ENIInfo, ip netip.Addr) error
}

// NopSDN is the SDN of an API-only emulator: every operation succeeds and nothing moves.
type NopSDN struct{}

// AttachENI does nothing.
func (NopSDN) AttachENI(ENIInfo) error { return nil }

// DetachENI does nothing.
func (NopSDN) DetachENI(ENIInfo) error { return nil }

// AssignIP does nothing.
func (NopSDN) AssignIP(ENIInfo, netip.Addr) error { return nil }

// UnassignIP does nothing.
func (NopSDN) UnassignIP(ENIInfo, netip.Addr) error { return nil }
