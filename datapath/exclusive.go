package datapath

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/nsutil"
)

// An exclusive-ENI pod owns a whole ENI: its link moves into the pod's namespace as the pod's
// interface, with the ENI's primary address and a default route via the vSwitch gateway, so
// the pod's traffic to the VPC goes straight out of its own NIC. Beside it a veth joins the
// pod to the node: the Service CIDR and the node's own addresses are routed through it, so
// ClusterIP traffic passes the pod programs on the host-side veth (load balancing, policy)
// and the node reaches the pod (kubelet probes) through the host veth, as for ENIIP pods.

// ExclusiveENI describes an exclusive-ENI pod's wiring.
type ExclusiveENI struct {
	MAC     net.HardwareAddr // the ENI's
	IP      netip.Addr       // its primary address: the pod's
	Prefix  netip.Prefix     // the vSwitch CIDR
	Gateway netip.Addr       // the vSwitch gateway
	PodNS   netns.NsHandle
	// PodIfName is the ENI's name in the pod (eth0); VethIfName the pod end of the veth.
	PodIfName  string
	VethIfName string
	HostIfName string // host end of the veth, in the node namespace
	// ViaVeth are the destinations routed through the veth: the Service CIDR and the node's
	// addresses.
	ViaVeth []netip.Prefix
	MTU     int
	// LinkTimeout bounds the wait for the attached ENI's link to appear in the node.
	LinkTimeout time.Duration
}

// ExclusiveVethName is the pod end of an exclusive-ENI pod's veth.
const ExclusiveVethName = "veth1"

// SetupExclusiveENI wires the pod. Run it on a thread in the node namespace. A repeated call
// (a retried ADD) finds the ENI already in the pod and configures it again.
func SetupExclusiveENI(x ExclusiveENI) (PodLinkResult, error) {
	var res PodLinkResult
	if !x.IP.Is4() || !x.Prefix.IsValid() || !x.Gateway.Is4() {
		return res, fmt.Errorf("exclusive ENI: address %s, vSwitch %s, gateway %s: want IPv4", x.IP, x.Prefix, x.Gateway)
	}
	if x.PodIfName == "" {
		x.PodIfName = "eth0"
	}
	if x.VethIfName == "" {
		x.VethIfName = ExclusiveVethName
	}
	if err := moveENIIntoPod(x); err != nil {
		return res, err
	}
	// The veth: SetupPodLink builds it with the pod's address on the pod end and a default
	// route through it; both are then narrowed to what goes to the node.
	res, err := SetupPodLink(PodLink{HostIfName: x.HostIfName, PodIfName: x.VethIfName, PodNS: x.PodNS, PodIP: x.IP, MTU: x.MTU})
	if err != nil {
		return res, err
	}
	err = nsutil.Do(x.PodNS, func() error {
		veth, err := netlink.LinkByName(x.VethIfName)
		if err != nil {
			return fmt.Errorf("find %s in the pod: %w", x.VethIfName, err)
		}
		eni, err := netlink.LinkByName(x.PodIfName)
		if err != nil {
			return fmt.Errorf("find the ENI %s in the pod: %w", x.PodIfName, err)
		}
		gw := PodGateway.AsSlice()
		def := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
		if err := netlink.RouteDel(&netlink.Route{LinkIndex: veth.Attrs().Index, Dst: def, Gw: gw}); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("remove the veth default route: %w", err)
		}
		// The address lives on the ENI only; the veth routes name it as their source.
		// Removing a device's last address flushes its neighbours (the permanent one too) and
		// routes: put the gateway's back.
		_ = netlink.AddrDel(veth, &netlink.Addr{IPNet: hostPrefix(x.IP)})
		if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: veth.Attrs().Index, Family: unix.AF_INET,
			State: netlink.NUD_PERMANENT, IP: gw, HardwareAddr: res.HostMAC}); err != nil {
			return fmt.Errorf("add permanent neighbour %s on %s: %w", PodGateway, x.VethIfName, err)
		}
		if err := netlink.RouteReplace(&netlink.Route{LinkIndex: veth.Attrs().Index, Scope: netlink.SCOPE_LINK,
			Dst: hostPrefix(PodGateway)}); err != nil {
			return fmt.Errorf("add route to %s on %s: %w", PodGateway, x.VethIfName, err)
		}
		if err := netlink.RouteReplace(&netlink.Route{LinkIndex: eni.Attrs().Index, Dst: def, Gw: x.Gateway.AsSlice(),
			Src: x.IP.AsSlice()}); err != nil {
			return fmt.Errorf("default route via the vSwitch gateway %s: %w", x.Gateway, err)
		}
		for _, p := range x.ViaVeth {
			if err := netlink.RouteReplace(&netlink.Route{LinkIndex: veth.Attrs().Index, Gw: gw, Src: x.IP.AsSlice(),
				Flags: int(netlink.FLAG_ONLINK), Dst: &net.IPNet{IP: p.Masked().Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}}); err != nil {
				return fmt.Errorf("route %s through %s: %w", p, x.VethIfName, err)
			}
		}
		return nil
	})
	if err != nil {
		_ = DeletePodLink(x.HostIfName)
		return res, err
	}
	// Traffic to the pod from the node (and from local pods) takes the veth: the main table
	// has the /32 through the host veth; this rule puts it before the ENI tables.
	to := netlink.NewRule()
	to.Dst = hostPrefix(x.IP)
	to.Table = mainTable
	to.Priority = ToPodRulePriority
	if err := netlink.RuleAdd(to); err != nil && !errors.Is(err, unix.EEXIST) {
		_ = DeletePodLink(x.HostIfName)
		return res, fmt.Errorf("add rule to %s lookup main prio %d: %w", x.IP, ToPodRulePriority, err)
	}
	return res, nil
}

// moveENIIntoPod moves the ENI's link from the node into the pod, names it and gives it the
// address. The link may already be in the pod (a retried ADD).
func moveENIIntoPod(x ExclusiveENI) error {
	inPod := false
	if err := nsutil.Do(x.PodNS, func() error {
		l, err := linkWithMAC(x.MAC)
		inPod = err == nil && l != nil
		return nil
	}); err != nil {
		return err
	}
	if !inPod {
		l, err := FindLinkByMAC(x.MAC, x.LinkTimeout)
		if err != nil {
			return err
		}
		if err := netlink.LinkSetDown(l); err != nil {
			return fmt.Errorf("set ENI link %s down before the move: %w", l.Attrs().Name, err)
		}
		if err := netlink.LinkSetNsFd(l, int(x.PodNS)); err != nil {
			return fmt.Errorf("move ENI link %s into the pod's namespace: %w", l.Attrs().Name, err)
		}
	}
	return nsutil.Do(x.PodNS, func() error {
		l, err := linkWithMAC(x.MAC)
		if err != nil {
			return err
		}
		if l == nil {
			return fmt.Errorf("ENI link with MAC %s is not in the pod after the move", x.MAC)
		}
		if l.Attrs().Name != x.PodIfName {
			if err := netlink.LinkSetDown(l); err != nil {
				return err
			}
			if err := netlink.LinkSetName(l, x.PodIfName); err != nil {
				return fmt.Errorf("rename the ENI link to %s in the pod: %w", x.PodIfName, err)
			}
		}
		if x.MTU > 0 {
			if err := netlink.LinkSetMTU(l, x.MTU); err != nil {
				return fmt.Errorf("set MTU %d on the ENI: %w", x.MTU, err)
			}
		}
		if err := disableIPv6(x.PodIfName); err != nil {
			return err
		}
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: x.IP.AsSlice(), Mask: net.CIDRMask(x.Prefix.Bits(), 32)}}
		if err := netlink.AddrReplace(l, addr); err != nil {
			return fmt.Errorf("add %s to the ENI in the pod: %w", addr, err)
		}
		if lo, err := netlink.LinkByName("lo"); err == nil {
			_ = netlink.LinkSetUp(lo)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return fmt.Errorf("set the ENI %s up in the pod: %w", x.PodIfName, err)
		}
		return WaitOperUp(x.PodIfName, 5*time.Second)
	})
}

// linkWithMAC finds a link of the current namespace by MAC (nil, nil when none has it).
func linkWithMAC(mac net.HardwareAddr) (netlink.Link, error) {
	links, err := retryDump(netlink.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	for _, l := range links {
		if bytes.Equal(l.Attrs().HardwareAddr, mac) {
			return l, nil
		}
	}
	return nil, nil
}

// ReturnExclusiveENI moves the ENI's link from the pod back to the node (down, unaddressed),
// so that detaching it finds it where the instance expects. A pod namespace that is gone, or
// an ENI no longer in it, is fine: the cloud's detach removes the device either way.
func ReturnExclusiveENI(podNS netns.NsHandle, mac net.HardwareAddr, nodeNS netns.NsHandle) error {
	return nsutil.Do(podNS, func() error {
		l, err := linkWithMAC(mac)
		if err != nil || l == nil {
			return err
		}
		_ = netlink.LinkSetDown(l)
		addrs, _ := netlink.AddrList(l, netlink.FAMILY_V4)
		for _, a := range addrs {
			_ = netlink.AddrDel(l, &a)
		}
		// Its pod name (eth0) is the node's primary NIC's: a name of its own first.
		if err := netlink.LinkSetName(l, fmt.Sprintf("eni%x", []byte(mac)[3:])); err != nil {
			return fmt.Errorf("rename ENI link %s before moving it back: %w", l.Attrs().Name, err)
		}
		if err := netlink.LinkSetNsFd(l, int(nodeNS)); err != nil {
			return fmt.Errorf("move ENI link %s back to the node: %w", l.Attrs().Name, err)
		}
		return nil
	})
}

// DeleteExclusiveRule removes the "to pod → main" rule of an exclusive-ENI pod.
func DeleteExclusiveRule(ip netip.Addr) error { return DeletePodRules(ip) }
