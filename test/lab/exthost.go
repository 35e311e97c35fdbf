//go:build linux

package lab

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/tern-net/tern/internal/nsutil"
)

// External hosts: clients outside the cluster (the internet, an on-premises network), in a
// namespace of their own behind the VPC router, for NodePort and LoadBalancer tests.

// ExternalHost is a client outside the VPC. Its namespace closes with the lab.
type ExternalHost struct {
	NS   netns.NsHandle
	Addr netip.Addr
}

// AddExternalHost plugs a namespace into the VPC router by a veth pair: the host gets
// addr/24 and a default route via the first address of that /24, which the router takes.
// The nodes reach it through their default routes (the router is their gateway).
func (l *Lab) AddExternalHost(addr netip.Addr) (*ExternalHost, error) {
	ns, err := nsutil.NewAnon()
	if err != nil {
		return nil, fmt.Errorf("lab: external host namespace: %w", err)
	}
	l.mu.Lock()
	l.externalHosts = append(l.externalHosts, ns)
	idx := len(l.externalHosts)
	l.mu.Unlock()
	p := netip.PrefixFrom(addr, 24).Masked()
	gw := p.Addr().Next()
	hostSide, vpcSide := "ext0", fmt.Sprintf("ext%d", idx)
	err = nsutil.Do(ns, func() error {
		la := netlink.NewLinkAttrs()
		la.Name = hostSide
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: vpcSide, PeerNamespace: netlink.NsFd(int(l.vpc))}); err != nil {
			return err
		}
		return configure(hostSide, netip.PrefixFrom(addr, 24), &gw)
	})
	if err == nil {
		err = nsutil.Do(l.vpc, func() error { return configure(vpcSide, netip.PrefixFrom(gw, 24), nil) })
	}
	if err != nil {
		return nil, fmt.Errorf("lab: external host %s: %w", addr, err)
	}
	return &ExternalHost{NS: ns, Addr: addr}, nil
}

func configure(link string, addr netip.Prefix, gw *netip.Addr) error {
	lk, err := netlink.LinkByName(link)
	if err != nil {
		return err
	}
	if err := netlink.AddrAdd(lk, &netlink.Addr{IPNet: &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), 32)}}); err != nil {
		return fmt.Errorf("address %s on %s: %w", addr, link, err)
	}
	if err := netlink.LinkSetUp(lk); err != nil {
		return err
	}
	if lo, err := netlink.LinkByName("lo"); err == nil {
		_ = netlink.LinkSetUp(lo)
	}
	if gw == nil {
		return nil
	}
	return netlink.RouteAdd(&netlink.Route{Gw: gw.AsSlice(), LinkIndex: lk.Attrs().Index})
}
