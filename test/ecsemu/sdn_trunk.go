//go:build linux

package ecsemu

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/test/ecsemu/vlanbpf"
)

// The VPC side of ENI trunking in NetnsSDN. A member ENI has no veth: its addresses are
// routed in the VPC namespace to the trunk ENI's VPC-side veth, with the neighbour pinned to
// the trunk's MAC (the guest receives member traffic on the trunk's link, as a VLAN
// sub-interface of the trunk would). Two tc programs on that veth (vlanbpf) make the VLAN
// real: frames to a member's address leave tagged with its VLAN id, and frames from the
// instance pass only with the tag of the member that owns their source address. A member
// without its tag, or with another member's, is dropped: that is the VPC's source check.

// vpcTrunk holds the loaded VLAN programs and their tcx links per trunk ENI.
type vpcTrunk struct {
	objs  vlanbpf.VpcObjects
	links map[string][]link.Link // trunk ENI ID → its two tcx links
}

func (s *NetnsSDN) trunkLocked() (*vpcTrunk, error) {
	if s.trunk != nil {
		return s.trunk, nil
	}
	t := &vpcTrunk{links: map[string][]link.Link{}}
	if err := vlanbpf.LoadVpcObjects(&t.objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load the VPC's VLAN programs: %+v", ve)
		}
		return nil, fmt.Errorf("load the VPC's VLAN programs: %w", err)
	}
	s.trunk = t
	return t, nil
}

// trunkLinkLocked returns the trunk ENI's VPC-side veth with the VLAN programs on it.
func (s *NetnsSDN) trunkLinkLocked(eni ENIInfo) (netlink.Link, *vpcTrunk, error) {
	l, err := s.vpcH.LinkByName(VPCLinkName(eni.TrunkID))
	if err != nil {
		return nil, nil, fmt.Errorf("member ENI %s: find the veth of its trunk ENI %s in the VPC namespace: %w", eni.ID, eni.TrunkID, err)
	}
	t, err := s.trunkLocked()
	if err != nil {
		return nil, nil, err
	}
	if _, ok := t.links[eni.TrunkID]; ok {
		return l, t, nil
	}
	idx := l.Attrs().Index
	var links []link.Link
	err = nsutil.Do(s.vpc, func() error { // tcx resolves the ifindex in the calling thread's namespace
		for _, a := range []struct {
			prog   *ebpf.Program
			attach ebpf.AttachType
		}{{t.objs.VpcVlanToNode, ebpf.AttachTCXEgress}, {t.objs.VpcVlanFromNode, ebpf.AttachTCXIngress}} {
			tl, err := link.AttachTCX(link.TCXOptions{Interface: idx, Program: a.prog, Attach: a.attach})
			if err != nil {
				return fmt.Errorf("attach the VPC's VLAN program to %s (%v): %w", l.Attrs().Name, a.attach, err)
			}
			links = append(links, tl)
		}
		return nil
	})
	if err != nil {
		for _, tl := range links {
			tl.Close()
		}
		return nil, nil, err
	}
	t.links[eni.TrunkID] = links
	return l, t, nil
}

func (s *NetnsSDN) attachMemberLocked(eni ENIInfo) error {
	if eni.VLAN < 1 || eni.VLAN > maxVLAN {
		return fmt.Errorf("member ENI %s: VLAN id %d outside 1..%d", eni.ID, eni.VLAN, maxVLAN)
	}
	if err := s.ensureGatewayLocked(eni.Gateway); err != nil {
		return err
	}
	for i, ip := range eni.IPs {
		if err := s.routeMemberLocked(eni, ip); err != nil {
			for _, undo := range eni.IPs[:i] {
				_ = s.unrouteMemberLocked(eni, undo)
			}
			return err
		}
	}
	return nil
}

func (s *NetnsSDN) detachMemberLocked(eni ENIInfo) error {
	var errs []error
	for _, ip := range eni.IPs {
		errs = append(errs, s.unrouteMemberLocked(eni, ip))
	}
	return errors.Join(errs...)
}

func addrKey(ip netip.Addr) uint32 {
	b := ip.As4()
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24 // network order in memory
}

// routeMemberLocked routes ip to the trunk's veth, pins its neighbour to the trunk's MAC and
// gives it the member's VLAN.
func (s *NetnsSDN) routeMemberLocked(eni ENIInfo, ip netip.Addr) error {
	l, t, err := s.trunkLinkLocked(eni)
	if err != nil {
		return err
	}
	idx := l.Attrs().Index
	v := vlanbpf.VpcMember{Ifindex: uint32(idx), Vid: uint32(eni.VLAN)}
	if err := t.objs.VpcMembers.Put(addrKey(ip), v); err != nil {
		return fmt.Errorf("give %s (member ENI %s) VLAN %d in the VPC: %w", ip, eni.ID, eni.VLAN, err)
	}
	if err := s.vpcH.RouteReplace(hostRoute(ip, idx)); err != nil {
		return fmt.Errorf("route %s to trunk ENI %s (member %s) in the VPC namespace: %w", ip, eni.TrunkID, eni.ID, err)
	}
	if err := s.vpcH.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
		IP: ip.AsSlice(), HardwareAddr: eni.TrunkMAC}); err != nil {
		return fmt.Errorf("add neighbour %s -> %s (trunk %s) in the VPC namespace: %w", ip, eni.TrunkMAC, eni.TrunkID, err)
	}
	return nil
}

// unrouteMemberLocked undoes routeMemberLocked; what is already gone is not an error.
func (s *NetnsSDN) unrouteMemberLocked(eni ENIInfo, ip netip.Addr) error {
	var errs []error
	if s.trunk != nil {
		if err := s.trunk.objs.VpcMembers.Delete(addrKey(ip)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("remove the VLAN of %s (member ENI %s): %w", ip, eni.ID, err))
		}
	}
	l, err := s.vpcH.LinkByName(VPCLinkName(eni.TrunkID))
	if err != nil {
		return errors.Join(errs...) // the trunk's veth, and so the route, is gone
	}
	if err := s.vpcH.RouteDel(hostRoute(ip, l.Attrs().Index)); err != nil && !errors.Is(err, unix.ESRCH) {
		errs = append(errs, fmt.Errorf("remove route %s of member ENI %s: %w", ip, eni.ID, err))
	}
	n := &netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_INET, IP: ip.AsSlice()}
	if err := s.vpcH.NeighDel(n); err != nil && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("remove neighbour %s of member ENI %s: %w", ip, eni.ID, err))
	}
	return errors.Join(errs...)
}

// forgetTrunkLocked drops the tcx links of a trunk ENI whose veth goes away.
func (s *NetnsSDN) forgetTrunkLocked(trunkID string) {
	if s.trunk == nil {
		return
	}
	for _, l := range s.trunk.links[trunkID] {
		l.Close()
	}
	delete(s.trunk.links, trunkID)
}

func (s *NetnsSDN) closeTrunkLocked() error {
	if s.trunk == nil {
		return nil
	}
	for id := range s.trunk.links {
		s.forgetTrunkLocked(id)
	}
	err := s.trunk.objs.Close()
	s.trunk = nil
	return err
}
