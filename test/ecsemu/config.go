package ecsemu

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"time"
)

// Config describes the emulated cloud: one region, one VPC, its vSwitches, the instance types
// on offer, the running instances and the credentials the API accepts. It is plain JSON so a
// lab can ship it as a file (see testdata/lab.json).
type Config struct {
	RegionID       string               `json:"regionId"`
	VPC            VPCConfig            `json:"vpc"`
	VSwitches      []VSwitchConfig      `json:"vSwitches"`
	SecurityGroups []string             `json:"securityGroups"`
	InstanceTypes  []InstanceTypeConfig `json:"instanceTypes"`
	Instances      []InstanceConfig     `json:"instances"`
	AccessKeys     []AccessKey          `json:"accessKeys"`
	// Latency delays every OpenAPI call, like the round trip to a real endpoint.
	Latency Duration `json:"latency"`
	// Delays of the asynchronous ENI state transitions.
	Delays TransitionDelays `json:"delays"`
	// ListingLag makes DescribeNetworkInterfaces and the route entry listings eventually
	// consistent (default: none).
	ListingLag ListingLag `json:"listingLag"`
	// MaxClockSkew bounds |Timestamp - now|; zero means the real API's 15 minutes.
	MaxClockSkew Duration `json:"maxClockSkew"`
	// Timing is "realistic" (the default) or "fast". Realistic fills every zero field of
	// Latency, Delays and ListingLag from RealisticTiming, so an emulator nobody tuned takes
	// seconds for what takes seconds in the cloud; fast keeps the fields as given (zero: the
	// change completes before the call returns), as unit and lab tests want.
	Timing string `json:"timing,omitempty"`
	// RouteEntryQuota is how many custom entries the VPC route table takes (default
	// DefaultRouteEntryQuota, the documented 48).
	RouteEntryQuota int `json:"routeEntryQuota,omitempty"`
}

// Timing names of Config.Timing.
const (
	TimingRealistic = "realistic"
	TimingFast      = "fast"
)

// VPCConfig is the VPC every vSwitch belongs to. NetNSPath, when set, names the network
// namespace that plays the VPC router (used by cmd/ecs-emulator to build a NetnsSDN).
type VPCConfig struct {
	ID        string `json:"id"`
	CIDR      string `json:"cidr"`
	NetNSPath string `json:"netnsPath,omitempty"`
	// RouteTableID names the VPC's (system) route table; default "vtb-" + the VPC ID's tail.
	RouteTableID string `json:"routeTableId,omitempty"`
}

// VSwitchConfig is one vSwitch (subnet) of the VPC in one zone.
type VSwitchConfig struct {
	ID   string `json:"id"`
	Zone string `json:"zone"`
	CIDR string `json:"cidr"`
}

// InstanceTypeConfig carries the DescribeInstanceTypes fields that IPAM cares about.
// EniQuantity counts the primary ENI; EniPrivateIpAddressQuantity counts an ENI's primary IP.
type InstanceTypeConfig struct {
	ID                          string  `json:"id"`
	CpuCoreCount                int     `json:"cpuCoreCount"`
	MemorySize                  float64 `json:"memorySize"`
	EniQuantity                 int     `json:"eniQuantity"`
	EniPrivateIpAddressQuantity int     `json:"eniPrivateIpAddressQuantity"`
	EniTotalQuantity            int     `json:"eniTotalQuantity"`
	EniTrunkSupported           bool    `json:"eniTrunkSupported"`
	EniIpv6AddressQuantity      int     `json:"eniIpv6AddressQuantity"`
}

// InstanceConfig is one running ECS instance. Its primary ENI exists from the start, in use,
// carrying PrimaryIP from VSwitchID. NetNSPath names the node's network namespace.
type InstanceConfig struct {
	ID             string   `json:"id"`
	Type           string   `json:"type"`
	Zone           string   `json:"zone"`
	VSwitchID      string   `json:"vSwitchId"`
	PrimaryIP      string   `json:"primaryIp"`
	SecurityGroups []string `json:"securityGroups,omitempty"`
	NetNSPath      string   `json:"netnsPath,omitempty"`
}

// AccessKey is one accepted AccessKeyId/secret pair. With SecurityToken set the key is an
// STS key: a call must carry that exact SecurityToken (InvalidSecurityToken.Mismatch
// otherwise), as Alibaba Cloud refuses an STS key presented without its token.
type AccessKey struct {
	ID            string `json:"id"`
	Secret        string `json:"secret"`
	SecurityToken string `json:"securityToken,omitempty"`
}

// TransitionDelays set how long an ENI stays in each transient state. Zero means the
// transition completes before the API call returns.
type TransitionDelays struct {
	Attach Duration `json:"attach"`
	Detach Duration `json:"detach"`
	Delete Duration `json:"delete"`
	// MemberAttach is how long a member ENI stays Attaching (and Detaching) when it joins or
	// leaves a trunk ENI: no NIC is hot-plugged, only a VLAN assigned (trunk.go).
	MemberAttach Duration `json:"memberAttach,omitempty"`
	// Metadata is how long an ENI stays invisible in the instance metadata after it turns
	// InUse: the real metadata service lags behind a fresh attach.
	Metadata Duration `json:"metadata,omitempty"`
	// Route is how long a new route entry stays Pending before it is Available and forwards;
	// RouteDelete how long a deleted one stays listed (and forwarding) before it is gone.
	Route       Duration `json:"route,omitempty"`
	RouteDelete Duration `json:"routeDelete,omitempty"`
}

// RealisticTiming is what Config.Timing "realistic" fills in: values the cloud documents or
// that Terway's code is tuned for (AliyunContainerService/terway pkg/backoff/backoff.go),
// where neither exists an assumption, marked as such:
//
//   - Attach 3 s: Terway's WaitENIStatus waits an InitialDelay of 3 s before its first status
//     poll after AttachNetworkInterface (then polls every 3 s × 1.5^n): the attach is expected
//     to take about that long.
//   - Detach 3 s: the same backoff waits for a detach; Terway also sleeps its 3 s Duration
//     between a detach and the delete of a robbed ENI.
//   - Delete 1 s: assumed (no documented figure; Terway does not wait for it).
//   - MemberAttach 2 s: Terway's WaitMemberENIStatus waits an InitialDelay of 2 s before it
//     first reads a member ENI attached to a trunk (then polls every 1 s × 1.5^n).
//   - Metadata 1.1 s: Terway polls the metadata service for a freshly assigned address every
//     1.1 s (MetaAssignPrivateIP, 10 steps): one poll interval of lag.
//   - Listing lag 1 s for new and removed addresses and 1 s for a status: assumed; the API
//     documents no read-after-write guarantee (docs/ipam.md) and Terway reads new addresses
//     from the Assign reply for that reason. Reassign 1 s (an unassigned address refused to
//     an assign by name): assumed, as long as the listing keeps showing it. Routes 1 s (the
//     route entry listing): assumed likewise; the VPC API documents no read-after-write
//     guarantee for DescribeRouteEntryList either.
//   - Route 5 s, RouteDelete 5 s: "Route Entry does not support creating or deleting within
//     5 seconds frequently" (the comment over CreateRouteEntry's IncorrectRouteEntryStatus
//     retry in the Alibaba Cloud Terraform provider, resource_alicloud_route_entry.go); the
//     table's entries are Pending meanwhile.
//   - Latency 100 ms per call: assumed round trip to a regional OpenAPI endpoint.
func RealisticTiming() (latency Duration, d TransitionDelays, lag ListingLag) {
	s := func(x float64) Duration { return Duration(x * float64(time.Second)) }
	return s(0.1),
		TransitionDelays{Attach: s(3), Detach: s(3), Delete: s(1), MemberAttach: s(2), Metadata: s(1.1), Route: s(5), RouteDelete: s(5)},
		ListingLag{Assigned: s(1), Unassigned: s(1), Status: s(1), Reassign: s(1), Routes: s(1)}
}

// applyTiming fills the zero timing fields of a realistic config.
func (c *Config) applyTiming() {
	if c.Timing == TimingFast {
		return
	}
	lat, d, lag := RealisticTiming()
	fill := func(dst *Duration, v Duration) {
		if *dst == 0 {
			*dst = v
		}
	}
	fill(&c.Latency, lat)
	fill(&c.Delays.Attach, d.Attach)
	fill(&c.Delays.Detach, d.Detach)
	fill(&c.Delays.Delete, d.Delete)
	fill(&c.Delays.MemberAttach, d.MemberAttach)
	fill(&c.Delays.Metadata, d.Metadata)
	fill(&c.Delays.Route, d.Route)
	fill(&c.Delays.RouteDelete, d.RouteDelete)
	fill(&c.ListingLag.Assigned, lag.Assigned)
	fill(&c.ListingLag.Unassigned, lag.Unassigned)
	fill(&c.ListingLag.Status, lag.Status)
	fill(&c.ListingLag.Reassign, lag.Reassign)
	fill(&c.ListingLag.Routes, lag.Routes)
}

// Duration is a time.Duration that reads and writes JSON as a Go duration string ("1.5s").
type Duration time.Duration

// MarshalJSON writes the duration as a string such as "250ms".
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON accepts a duration string ("250ms") or a number of nanoseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("parse duration %q: %w (use Go syntax such as \"250ms\")", s, err)
		}
		*d = Duration(v)
		return nil
	}
	var n int64
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("duration %s is neither a string nor a number of nanoseconds", b)
	}
	*d = Duration(n)
	return nil
}

// LoadConfig reads and validates a JSON config file.
func LoadConfig(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read emulator config: %w", err)
	}
	var c Config
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("parse emulator config %s: %w", path, err)
	}
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("emulator config %s: %w", path, err)
	}
	return &c, nil
}

// Validate checks that the config is self-consistent: CIDRs parse, vSwitches sit inside the
// VPC, instances name known types and vSwitches, and primary IPs are usable addresses.
func (c *Config) Validate() error {
	if c.RegionID == "" {
		return fmt.Errorf("regionId is empty")
	}
	if c.VPC.ID == "" {
		return fmt.Errorf("vpc.id is empty")
	}
	vpc, err := netip.ParsePrefix(c.VPC.CIDR)
	if err != nil || !vpc.Addr().Is4() {
		return fmt.Errorf("vpc.cidr %q is not an IPv4 CIDR", c.VPC.CIDR)
	}
	if len(c.AccessKeys) == 0 {
		return fmt.Errorf("no accessKeys: the API would reject every call")
	}
	if c.Timing != "" && c.Timing != TimingRealistic && c.Timing != TimingFast {
		return fmt.Errorf("timing %q is not %q or %q", c.Timing, TimingRealistic, TimingFast)
	}
	if c.RouteEntryQuota < 0 {
		return fmt.Errorf("routeEntryQuota %d is negative", c.RouteEntryQuota)
	}
	vsw := map[string]VSwitchConfig{}
	for _, v := range c.VSwitches {
		p, err := netip.ParsePrefix(v.CIDR)
		if err != nil || !p.Addr().Is4() || p.Masked() != p {
			return fmt.Errorf("vSwitch %s: cidr %q is not a canonical IPv4 CIDR", v.ID, v.CIDR)
		}
		if p.Bits() > 29 {
			return fmt.Errorf("vSwitch %s: cidr %s is smaller than /29, the smallest Alibaba Cloud allows", v.ID, v.CIDR)
		}
		if !vpc.Contains(p.Addr()) || p.Bits() < vpc.Bits() {
			return fmt.Errorf("vSwitch %s: cidr %s is outside vpc %s", v.ID, v.CIDR, c.VPC.CIDR)
		}
		if _, dup := vsw[v.ID]; dup || v.ID == "" {
			return fmt.Errorf("vSwitch id %q is empty or duplicated", v.ID)
		}
		vsw[v.ID] = v
	}
	types := map[string]bool{}
	for _, t := range c.InstanceTypes {
		if t.EniQuantity < 1 || t.EniPrivateIpAddressQuantity < 1 {
			return fmt.Errorf("instance type %s: eniQuantity and eniPrivateIpAddressQuantity must be at least 1", t.ID)
		}
		types[t.ID] = true
	}
	ids := map[string]bool{}
	for _, in := range c.Instances {
		if in.ID == "" || ids[in.ID] {
			return fmt.Errorf("instance id %q is empty or duplicated", in.ID)
		}
		ids[in.ID] = true
		if !types[in.Type] {
			return fmt.Errorf("instance %s: unknown instance type %q (add it to instanceTypes)", in.ID, in.Type)
		}
		v, ok := vsw[in.VSwitchID]
		if !ok {
			return fmt.Errorf("instance %s: unknown vSwitch %q", in.ID, in.VSwitchID)
		}
		if in.Zone != "" && in.Zone != v.Zone {
			return fmt.Errorf("instance %s: zone %s differs from its vSwitch %s zone %s", in.ID, in.Zone, v.ID, v.Zone)
		}
		ip, err := netip.ParseAddr(in.PrimaryIP)
		if err != nil {
			return fmt.Errorf("instance %s: primaryIp %q: %w", in.ID, in.PrimaryIP, err)
		}
		if !usable(netip.MustParsePrefix(v.CIDR), ip) {
			return fmt.Errorf("instance %s: primaryIp %s is not a usable address of vSwitch %s (%s)", in.ID, ip, v.ID, v.CIDR)
		}
	}
	return nil
}

// Clone returns a deep copy, so tests can derive configs from TestConfig without aliasing.
func (c *Config) Clone() *Config {
	b, err := json.Marshal(c)
	if err != nil {
		panic(fmt.Sprintf("ecsemu: marshal config: %v", err)) // only plain fields: cannot fail
	}
	var out Config
	if err := json.Unmarshal(b, &out); err != nil {
		panic(fmt.Sprintf("ecsemu: unmarshal config: %v", err))
	}
	return &out
}

// Test credentials of TestConfig.
const (
	TestAccessKeyID     = "LTAItestkey0001"
	TestAccessKeySecret = "test-secret-0001"
	TestRegion          = "cn-hangzhou"
)

// Instance types with their ENI limits. The g7 numbers are those of the ENIIP planning table
// users size clusters by (issue 12, /work/shared/FACTS.md "Capacity (ENIIP)"): pods =
// (EniQuantity − 1) × EniPrivateIpAddressQuantity = 12, 30, 45, 140. They could not be
// re-checked against the live documentation from this machine.
func g7Types() []InstanceTypeConfig {
	return []InstanceTypeConfig{
		{ID: "ecs.g7.large", CpuCoreCount: 2, MemorySize: 8, EniQuantity: 3, EniPrivateIpAddressQuantity: 6, EniTotalQuantity: 3, EniIpv6AddressQuantity: 6},
		{ID: "ecs.g7.xlarge", CpuCoreCount: 4, MemorySize: 16, EniQuantity: 4, EniPrivateIpAddressQuantity: 10, EniTotalQuantity: 4, EniIpv6AddressQuantity: 10},
		{ID: "ecs.g7.2xlarge", CpuCoreCount: 8, MemorySize: 32, EniQuantity: 4, EniPrivateIpAddressQuantity: 15, EniTotalQuantity: 4, EniIpv6AddressQuantity: 15},
		{ID: "ecs.g7.4xlarge", CpuCoreCount: 16, MemorySize: 64, EniQuantity: 8, EniPrivateIpAddressQuantity: 20, EniTotalQuantity: 8, EniIpv6AddressQuantity: 20},
	}
}

// TestConfig returns a small valid config: region cn-hangzhou, VPC 192.168.0.0/16, vSwitches
// vsw-test-a (192.168.1.0/24) and vsw-test-b (192.168.2.0/24) in cn-hangzhou-h, security group
// sg-test, the g7 instance types, one ecs.g7.large instance i-test-0001 at 192.168.1.10, the
// Test* credentials and fast timing (every transition immediate). Add more instances with
// AddInstance.
func TestConfig() *Config {
	c := &Config{
		RegionID: TestRegion,
		VPC:      VPCConfig{ID: "vpc-test", CIDR: "192.168.0.0/16"},
		VSwitches: []VSwitchConfig{
			{ID: "vsw-test-a", Zone: "cn-hangzhou-h", CIDR: "192.168.1.0/24"},
			{ID: "vsw-test-b", Zone: "cn-hangzhou-h", CIDR: "192.168.2.0/24"},
		},
		SecurityGroups: []string{"sg-test"},
		InstanceTypes:  g7Types(),
		AccessKeys:     []AccessKey{{ID: TestAccessKeyID, Secret: TestAccessKeySecret}},
		Timing:         TimingFast,
	}
	c.AddInstance("i-test-0001", "ecs.g7.large", "vsw-test-a", "192.168.1.10")
	return c
}

// AddInstance appends a running instance of the given type on vSwitchID with primaryIP; its
// zone is the vSwitch's and its security group the config's first.
func (c *Config) AddInstance(id, instanceType, vSwitchID, primaryIP string) *InstanceConfig {
	zone := ""
	for _, v := range c.VSwitches {
		if v.ID == vSwitchID {
			zone = v.Zone
		}
	}
	in := InstanceConfig{ID: id, Type: instanceType, Zone: zone, VSwitchID: vSwitchID, PrimaryIP: primaryIP}
	if len(c.SecurityGroups) > 0 {
		in.SecurityGroups = []string{c.SecurityGroups[0]}
	}
	c.Instances = append(c.Instances, in)
	return &c.Instances[len(c.Instances)-1]
}

// usable reports whether ip may be handed out in p: Alibaba Cloud reserves the first address
// and the last three of every vSwitch (the gateway is the third from last).
func usable(p netip.Prefix, ip netip.Addr) bool {
	if !p.Contains(ip) || ip == p.Addr() {
		return false
	}
	last := lastAddr(p)
	for range 3 {
		if ip == last {
			return false
		}
		last = last.Prev()
	}
	return true
}

// lastAddr is the broadcast address of an IPv4 prefix.
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v |= host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// gatewayOf is the vSwitch gateway: the third address from the end of the CIDR.
func gatewayOf(p netip.Prefix) netip.Addr { return lastAddr(p).Prev().Prev() }

// usableCount is the number of addresses a vSwitch can hand out.
func usableCount(p netip.Prefix) int { return 1<<(32-p.Bits()) - 4 }
