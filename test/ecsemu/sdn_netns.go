//go:build linux

package ecsemu

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/nsutil"
)

// NetnsSDN realises the emulated VPC with network namespaces and veth pairs:
//
//   - The VPC namespace is the VPC router. It forwards between ENIs (ip_forward=1) and holds
//     every vSwitch gateway as a /32 on its loopback. Linux answers ARP for any local address
//     on any interface, so each ENI's VPC-side veth answers for its gateway without carrying
//     an address itself. proxy_arp on each VPC-side veth (with proxy_delay 0, otherwise the
//     first reply waits up to 0.8 s) lets guests reach same-subnet peers directly, as the
//     real vSwitch does.
//   - An attached ENI is a veth pair: the guest end, named eth<DeviceIndex> and carrying the
//     ENI's MAC, sits in the node namespace; the VPC end, "ve-" plus the tail of the ENI ID,
//     stays in the VPC namespace, UP, with a /32 route for every address of the ENI.
//   - A secondary ENI's guest end is left DOWN and unconfigured: configuring it is the agent's
//     job, as on a real instance. A primary ENI's guest end becomes eth0 with the instance's
//     primary IP (vSwitch prefix) and a default route via the gateway, like cloud-init does.
type NetnsSDN struct {
	log   *zap.Logger
	vpc   netns.NsHandle
	nodes map[string]netns.NsHandle
	owned []netns.NsHandle // handles opened from paths, closed by Close
	vpcH  *netlink.Handle

	mu    sync.Mutex
	gws   map[netip.Addr]bool // gateway addresses put on the VPC loopback
	trunk *vpcTrunk           // VLAN programs of trunk ENIs, loaded at the first member (sdn_trunk.go)
}

// NewNetnsSDN builds an SDN over the VPC namespace vpc and one namespace per instance ID.
// The caller keeps ownership of the handles and must keep them open until Close.
func NewNetnsSDN(vpc netns.NsHandle, nodes map[string]netns.NsHandle, log *zap.Logger) (*NetnsSDN, error) {
	if log == nil {
		log = zap.NewNop()
	}
	h, err := netlink.NewHandleAt(vpc)
	if err != nil {
		return nil, fmt.Errorf("open netlink in the VPC namespace: %w", err)
	}
	s := &NetnsSDN{log: log, vpc: vpc, nodes: map[string]netns.NsHandle{}, vpcH: h, gws: map[netip.Addr]bool{}}
	for id, ns := range nodes {
		s.nodes[id] = ns
	}
	if err := s.initVPC(); err != nil {
		h.Close()
		return nil, err
	}
	return s, nil
}

// NewNetnsSDNFromConfig opens the namespaces named by cfg.VPC.NetNSPath and each instance's
// NetNSPath (e.g. /run/netns/x or /proc/<pid>/ns/net). Instances without a path get no data
// plane: attaching an ENI to them fails.
func NewNetnsSDNFromConfig(cfg *Config, log *zap.Logger) (*NetnsSDN, error) {
	if cfg.VPC.NetNSPath == "" {
		return nil, fmt.Errorf("vpc.netnsPath is empty: set it to the VPC router's network namespace")
	}
	var owned []netns.NsHandle
	closeAll := func() {
		for _, h := range owned {
			h.Close()
		}
	}
	vpc, err := netns.GetFromPath(cfg.VPC.NetNSPath)
	if err != nil {
		return nil, fmt.Errorf("open VPC network namespace %s: %w", cfg.VPC.NetNSPath, err)
	}
	owned = append(owned, vpc)
	nodes := map[string]netns.NsHandle{}
	for _, in := range cfg.Instances {
		if in.NetNSPath == "" {
			continue
		}
		h, err := netns.GetFromPath(in.NetNSPath)
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("open network namespace %s of instance %s: %w", in.NetNSPath, in.ID, err)
		}
		owned = append(owned, h)
		nodes[in.ID] = h
	}
	s, err := NewNetnsSDN(vpc, nodes, log)
	if err != nil {
		closeAll()
		return nil, err
	}
	s.owned = owned
	return s, nil
}

// initVPC turns the VPC namespace into a router.
func (s *NetnsSDN) initVPC() error {
	lo, err := s.vpcH.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo in the VPC namespace: %w", err)
	}
	if err := s.vpcH.LinkSetUp(lo); err != nil {
		return fmt.Errorf("bring up lo in the VPC namespace: %w", err)
	}
	return s.sysctls(map[string]string{
		"net/ipv4/ip_forward":             "1",
		"net/ipv4/conf/all/forwarding":    "1",
		"net/ipv4/conf/all/rp_filter":     "0",
		"net/ipv4/conf/default/rp_filter": "0",
	})
}

// sysctls writes /proc/sys entries from inside the VPC namespace (/proc/sys/net follows the
// writing thread's namespace).
func (s *NetnsSDN) sysctls(kv map[string]string) error {
	return nsutil.Do(s.vpc, func() error {
		for k, v := range kv {
			if err := os.WriteFile(filepath.Join("/proc/sys", k), []byte(v), 0o644); err != nil {
				return fmt.Errorf("set sysctl %s=%s in the VPC namespace: %w", k, v, err)
			}
		}
		return nil
	})
}

// Close releases namespace handles this SDN opened itself and removes the gateway addresses
// it added. Links are removed by DetachENI (Emulator.Close detaches everything first).
func (s *NetnsSDN) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	if lo, err := s.vpcH.LinkByName("lo"); err == nil {
		for gw := range s.gws {
			a := &netlink.Addr{IPNet: &net.IPNet{IP: gw.AsSlice(), Mask: net.CIDRMask(32, 32)}}
			if err := s.vpcH.AddrDel(lo, a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
				errs = append(errs, fmt.Errorf("remove gateway %s from the VPC namespace: %w", gw, err))
			}
		}
	}
	s.gws = map[netip.Addr]bool{}
	errs = append(errs, s.closeTrunkLocked())
	s.vpcH.Close()
	for _, h := range s.owned {
		h.Close()
	}
	s.owned = nil
	return errors.Join(errs...)
}

// VPCLinkName is the name of an ENI's veth end in the VPC namespace.
func VPCLinkName(eniID string) string {
	tail := eniID
	if len(tail) > 12 {
		tail = tail[len(tail)-12:]
	}
	return "ve-" + tail
}

// GuestLinkName is the name the guest sees for the ENI at deviceIndex.
func GuestLinkName(deviceIndex int) string { return fmt.Sprintf("eth%d", deviceIndex) }

func hostRoute(ip netip.Addr, linkIndex int) *netlink.Route {
	return &netlink.Route{
		LinkIndex: linkIndex,
		Dst:       &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(32, 32)},
		Scope:     netlink.SCOPE_LINK,
	}
}

// AttachENI creates the ENI's veth pair and routes its addresses.
func (s *NetnsSDN) AttachENI(eni ENIInfo) (err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if eni.TrunkID != "" {
		return s.attachMemberLocked(eni)
	}
	node, ok := s.nodes[eni.InstanceID]
	if !ok {
		return fmt.Errorf("attach ENI %s: no network namespace is configured for instance %s (set its netnsPath)", eni.ID, eni.InstanceID)
	}
	if err := s.ensureGatewayLocked(eni.Gateway); err != nil {
		return err
	}
	vpcName, guestName := VPCLinkName(eni.ID), GuestLinkName(eni.DeviceIndex)
	la := netlink.NewLinkAttrs()
	la.Name = vpcName
	veth := &netlink.Veth{LinkAttrs: la, PeerName: guestName, PeerHardwareAddr: eni.MAC,
		PeerNamespace: netlink.NsFd(node), PeerTxQLen: -1}
	if err := s.vpcH.LinkAdd(veth); err != nil {
		return fmt.Errorf("create veth %s/%s for ENI %s on instance %s: %w (is %s already taken in the node namespace?)",
			vpcName, guestName, eni.ID, eni.InstanceID, err, guestName)
	}
	defer func() {
		if err != nil {
			if l, lerr := s.vpcH.LinkByName(vpcName); lerr == nil {
				_ = s.vpcH.LinkDel(l)
			}
		}
	}()
	link, err := s.vpcH.LinkByName(vpcName)
	if err != nil {
		return fmt.Errorf("find veth %s in the VPC namespace: %w", vpcName, err)
	}
	if err := s.sysctls(map[string]string{
		"net/ipv4/conf/" + vpcName + "/proxy_arp":    "1",
		"net/ipv4/neigh/" + vpcName + "/proxy_delay": "0",
		"net/ipv4/conf/" + vpcName + "/rp_filter":    "0",
	}); err != nil {
		return err
	}
	if err := s.vpcH.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring up %s in the VPC namespace: %w", vpcName, err)
	}
	for _, ip := range eni.IPs {
		if err := s.routeLocked(eni, ip, link.Attrs().Index); err != nil {
			return err
		}
	}
	if eni.Primary {
		if err := s.configurePrimary(node, guestName, eni); err != nil {
			return err
		}
		if err := waitOperUp(s.vpcH, vpcName); err != nil {
			return err
		}
	}
	return nil
}

// configurePrimary does what the image's network setup does for eth0: address, up, default
// route via the vSwitch gateway.
func (s *NetnsSDN) configurePrimary(node netns.NsHandle, name string, eni ENIInfo) error {
	h, err := netlink.NewHandleAt(node)
	if err != nil {
		return fmt.Errorf("open netlink in the namespace of instance %s: %w", eni.InstanceID, err)
	}
	defer h.Close()
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find %s of instance %s: %w", name, eni.InstanceID, err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: eni.IPs[0].AsSlice(), Mask: net.CIDRMask(eni.VSwitchCIDR.Bits(), 32)}}
	if err := h.AddrAdd(link, addr); err != nil {
		return fmt.Errorf("add %s to %s of instance %s: %w", addr, name, eni.InstanceID, err)
	}
	if lo, err := h.LinkByName("lo"); err == nil {
		_ = h.LinkSetUp(lo)
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring up %s of instance %s: %w", name, eni.InstanceID, err)
	}
	if err := waitOperUp(h, name); err != nil {
		return err
	}
	def := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: eni.Gateway.AsSlice(),
		Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}}
	if err := h.RouteReplace(def); err != nil {
		return fmt.Errorf("add default route via %s on %s of instance %s: %w", eni.Gateway, name, eni.InstanceID, err)
	}
	return nil
}

// waitOperUp waits until a link's operstate is UP: a fresh veth drops what it is given to
// send until then, which would lose the first ARP request.
func waitOperUp(h *netlink.Handle, name string) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		l, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("find %s while waiting for it to come up: %w", name, err)
		}
		if l.Attrs().OperState == netlink.OperUp {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s is still %s after 5s: its peer is probably down", name, l.Attrs().OperState)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (s *NetnsSDN) ensureGatewayLocked(gw netip.Addr) error {
	if s.gws[gw] {
		return nil
	}
	lo, err := s.vpcH.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo in the VPC namespace: %w", err)
	}
	a := &netlink.Addr{IPNet: &net.IPNet{IP: gw.AsSlice(), Mask: net.CIDRMask(32, 32)}}
	if err := s.vpcH.AddrAdd(lo, a); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add gateway %s to the VPC namespace: %w", gw, err)
	}
	s.gws[gw] = true
	return nil
}

// DetachENI deletes the ENI's veth pair; its routes go with it. A missing link is not an
// error, so detaching twice is harmless.
func (s *NetnsSDN) DetachENI(eni ENIInfo) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if eni.TrunkID != "" {
		return s.detachMemberLocked(eni)
	}
	s.forgetTrunkLocked(eni.ID)
	l, err := s.vpcH.LinkByName(VPCLinkName(eni.ID))
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("find veth of ENI %s in the VPC namespace: %w", eni.ID, err)
	}
	if err := s.vpcH.LinkDel(l); err != nil {
		return fmt.Errorf("delete veth of ENI %s: %w", eni.ID, err)
	}
	return nil
}

// AssignIP routes ip to the ENI's VPC-side veth.
func (s *NetnsSDN) AssignIP(eni ENIInfo, ip netip.Addr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if eni.TrunkID != "" {
		return s.routeMemberLocked(eni, ip)
	}
	l, err := s.vpcH.LinkByName(VPCLinkName(eni.ID))
	if err != nil {
		return fmt.Errorf("find veth of ENI %s in the VPC namespace: %w", eni.ID, err)
	}
	return s.routeLocked(eni, ip, l.Attrs().Index)
}

// routeLocked routes ip to the ENI's VPC-side veth and pins its neighbour entry to the ENI's
// MAC. The real VPC knows which ENI owns every address and never ARPs the guest for it; a
// secondary address usually belongs to a pod behind the node rather than to the node itself,
// so an ARP request would go unanswered.
func (s *NetnsSDN) routeLocked(eni ENIInfo, ip netip.Addr, linkIndex int) error {
	if err := s.vpcH.RouteReplace(hostRoute(ip, linkIndex)); err != nil {
		return fmt.Errorf("route %s to ENI %s in the VPC namespace: %w", ip, eni.ID, err)
	}
	if err := s.vpcH.NeighSet(&netlink.Neigh{LinkIndex: linkIndex, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
		IP: ip.AsSlice(), HardwareAddr: eni.MAC}); err != nil {
		return fmt.Errorf("add neighbour %s -> %s (ENI %s) in the VPC namespace: %w", ip, eni.MAC, eni.ID, err)
	}
	return nil
}

// UnassignIP removes the route of ip; a route already gone is not an error.
func (s *NetnsSDN) UnassignIP(eni ENIInfo, ip netip.Addr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if eni.TrunkID != "" {
		return s.unrouteMemberLocked(eni, ip)
	}
	l, err := s.vpcH.LinkByName(VPCLinkName(eni.ID))
	if err != nil {
		return nil // the link, and so the route, is gone
	}
	if err := s.vpcH.RouteDel(hostRoute(ip, l.Attrs().Index)); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("remove route %s of ENI %s from the VPC namespace: %w", ip, eni.ID, err)
	}
	n := &netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_INET, IP: ip.AsSlice()}
	if err := s.vpcH.NeighDel(n); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove neighbour %s of ENI %s from the VPC namespace: %w", ip, eni.ID, err)
	}
	return nil
}

var _ RouteSDN = (*NetnsSDN)(nil)

// AddRoute forwards dst in the VPC namespace to the instance's primary address through its
// primary ENI's VPC-side veth: a custom route entry whose next hop is the instance.
func (s *NetnsSDN) AddRoute(dst netip.Prefix, via ENIInfo) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, err := s.vpcH.LinkByName(VPCLinkName(via.ID))
	if err != nil {
		return fmt.Errorf("route %s to instance %s: find the veth of its ENI %s in the VPC namespace: %w", dst, via.InstanceID, via.ID, err)
	}
	r := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: prefixNet(dst), Gw: via.IPs[0].AsSlice(), Flags: int(netlink.FLAG_ONLINK)}
	if err := s.vpcH.RouteReplace(r); err != nil {
		return fmt.Errorf("route %s via %s (instance %s) in the VPC namespace: %w", dst, via.IPs[0], via.InstanceID, err)
	}
	return nil
}

// DelRoute removes the VPC namespace's route to dst; a route already gone is not an error.
func (s *NetnsSDN) DelRoute(dst netip.Prefix) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.vpcH.RouteDel(&netlink.Route{Dst: prefixNet(dst)}); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("remove route %s from the VPC namespace: %w", dst, err)
	}
	return nil
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
