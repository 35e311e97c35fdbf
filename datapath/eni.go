package datapath

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Policy routing for pods on ENI secondary addresses (Terway's scheme). Traffic to a pod is
// looked up in the main table, where the pod's /32 points at its host veth; traffic from a pod
// goes to the table of the ENI that owns its address, whose default route leads to that ENI's
// vSwitch gateway. The VPC only accepts a source address on the ENI it is assigned to, so pod
// egress must leave through the right ENI, never through the node's primary interface.
const (
	// ToPodRulePriority is the "to podIP lookup main" rule. It sorts before the from-pod rule
	// so that pod-to-pod traffic on one node never takes the detour through the VPC.
	ToPodRulePriority = 512
	// FromPodRulePriority is the "from podIP lookup <ENI table>" rule.
	FromPodRulePriority = 2048
	// ENITableBase plus the ENI link's ifindex is the ENI's routing table.
	ENITableBase = 1000
	mainTable    = unix.RT_TABLE_MAIN
)

// ENITable is the routing table of the ENI link with the given ifindex.
func ENITable(ifindex int) int { return ENITableBase + ifindex }

// ENI is what the node needs to know to route through one ENI.
type ENI struct {
	MAC net.HardwareAddr
	// PrimaryIP is the ENI's own address. It is never put on the link: the pool hands it to a
	// pod like a secondary address, and a local address would take the pod's traffic.
	PrimaryIP netip.Addr
	Gateway   netip.Addr // the vSwitch gateway
	// NodePrimary marks the instance's primary NIC (VPC route mode): the node's own
	// interface, whose addresses and IPv6 stay as the image configured them.
	NodePrimary bool
}

// ENILink is a configured ENI in the node namespace.
type ENILink struct {
	Name  string
	Index int
	Table int
}

// FindLinkByMAC returns the link with the given MAC, waiting up to timeout for it to appear:
// an ENI the cloud reports attached can show up in the guest a little later.
func FindLinkByMAC(mac net.HardwareAddr, timeout time.Duration) (netlink.Link, error) {
	deadline := time.Now().Add(timeout)
	for {
		links, err := retryDump(netlink.LinkList)
		if err != nil {
			return nil, fmt.Errorf("list links to find MAC %s: %w", mac, err)
		}
		for _, l := range links {
			if bytes.Equal(l.Attrs().HardwareAddr, mac) {
				return l, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no link with MAC %s after %s: is the ENI attached to this instance?", mac, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// EnsureENI makes the ENI with e.MAC usable for pod egress: the link is up, carries no
// address (its primary may be a pod's; one left by an earlier version is removed), has
// reverse-path filtering off (replies to pods
// arrive on it for addresses that are not the node's) and owns a routing table whose default
// route goes via the vSwitch gateway, onlink. It is idempotent and safe to run concurrently
// for the same ENI. Run it in the node namespace.
func EnsureENI(e ENI, timeout time.Duration) (ENILink, error) {
	if len(e.MAC) == 0 || !e.Gateway.Is4() {
		return ENILink{}, fmt.Errorf("ENI %+v: MAC and an IPv4 gateway are required", e)
	}
	l, err := FindLinkByMAC(e.MAC, timeout)
	if err != nil {
		return ENILink{}, err
	}
	name, idx := l.Attrs().Name, l.Attrs().Index
	out := ENILink{Name: name, Index: idx, Table: ENITable(idx)}
	if err := SetSysctl("net.ipv4.conf."+name+".rp_filter", "0"); err != nil {
		return out, err
	}
	if !e.NodePrimary {
		if err := disableIPv6(name); err != nil {
			return out, err
		}
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(l); err != nil {
			return out, fmt.Errorf("bring ENI link %s (MAC %s) up: %w", name, e.MAC, err)
		}
	}
	if e.PrimaryIP.Is4() && !e.NodePrimary {
		// Earlier versions put the primary on the link as a /32; as a local address it would
		// swallow the traffic of the pod that now holds it.
		a := &netlink.Addr{IPNet: &net.IPNet{IP: e.PrimaryIP.AsSlice(), Mask: net.CIDRMask(32, 32)}}
		if err := netlink.AddrDel(l, a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return out, fmt.Errorf("remove primary address %s from ENI link %s (it may serve a pod): %w", e.PrimaryIP, name, err)
		}
	}
	if err := WaitOperUp(name, timeout); err != nil {
		return out, fmt.Errorf("ENI link %s: %w", name, err)
	}
	def := &netlink.Route{LinkIndex: idx, Table: out.Table, Gw: e.Gateway.AsSlice(), Flags: int(netlink.FLAG_ONLINK),
		Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}}
	if err := netlink.RouteReplace(def); err != nil {
		return out, fmt.Errorf("add default route via %s dev %s to table %d: %w", e.Gateway, name, out.Table, err)
	}
	return out, nil
}

// retryDump repeats a netlink dump that the kernel interrupted: with pods coming and going,
// links and rules change while they are listed and the dump is flagged inconsistent.
func retryDump[T any](dump func() ([]T, error)) ([]T, error) {
	var err error
	for range 20 {
		var out []T
		if out, err = dump(); err == nil {
			return out, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return nil, err
		}
	}
	return nil, err
}

func hostPrefix(ip netip.Addr) *net.IPNet {
	return &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(32, 32)}
}

// SetupPodRules installs the two policy-routing rules of a pod address, replacing any left
// from an earlier owner of the address (which may have been on another ENI).
func SetupPodRules(podIP netip.Addr, table int) error {
	if err := DeletePodRules(podIP); err != nil {
		return err
	}
	to := netlink.NewRule()
	to.Dst = hostPrefix(podIP)
	to.Table = mainTable
	to.Priority = ToPodRulePriority
	if err := netlink.RuleAdd(to); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add rule to %s lookup main prio %d: %w", podIP, ToPodRulePriority, err)
	}
	from := netlink.NewRule()
	from.Src = hostPrefix(podIP)
	from.Table = table
	from.Priority = FromPodRulePriority
	if err := netlink.RuleAdd(from); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add rule from %s lookup %d prio %d: %w", podIP, table, FromPodRulePriority, err)
	}
	return nil
}

// PodRules is what the policy routing holds for one pod address.
type PodRules struct {
	ToMain    bool // "to podIP lookup main" at ToPodRulePriority
	FromTable int  // table of "from podIP" at FromPodRulePriority; 0 when absent
}

// PodRulesOf reads the rules installed for podIP.
func PodRulesOf(podIP netip.Addr) (PodRules, error) {
	var out PodRules
	rules, err := podRules(podIP)
	if err != nil {
		return out, err
	}
	for _, r := range rules {
		switch {
		case r.Priority == ToPodRulePriority && r.Dst != nil && r.Table == mainTable:
			out.ToMain = true
		case r.Priority == FromPodRulePriority && r.Src != nil:
			out.FromTable = r.Table
		}
	}
	return out, nil
}

func podRules(podIP netip.Addr) ([]netlink.Rule, error) {
	rules, err := retryDump(func() ([]netlink.Rule, error) { return netlink.RuleList(netlink.FAMILY_V4) })
	if err != nil {
		return nil, fmt.Errorf("list policy rules: %w", err)
	}
	want := hostPrefix(podIP).String()
	var out []netlink.Rule
	for _, r := range rules {
		if r.Priority != ToPodRulePriority && r.Priority != FromPodRulePriority {
			continue
		}
		if (r.Dst != nil && r.Dst.String() == want) || (r.Src != nil && r.Src.String() == want) {
			out = append(out, r)
		}
	}
	return out, nil
}

// DeletePodRules removes the policy-routing rules of a pod address. Missing rules are not an
// error, so teardown can be repeated.
func DeletePodRules(podIP netip.Addr) error {
	rules, err := podRules(podIP)
	if err != nil {
		return err
	}
	for _, r := range rules {
		if err := netlink.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("delete rule %s for pod %s: %w", r, podIP, err)
		}
	}
	return nil
}
