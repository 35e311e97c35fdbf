//go:build linux

package lab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/tern-net/tern/internal/nsutil"
)

// Addresses of the lab's external client: a host outside the VPC (an office, the
// internet behind the VPC's gateway), in TEST-NET-2 so it is never a lab or VPC address.
const (
	ExternalClientIP = "198.51.100.10"
	externalGateway  = "198.51.100.1" // the VPC router's side of the link
	externalPrefix   = 24
)

// External is a client outside the cluster: its own network namespace, linked to the VPC
// router, which routes the replies of every node back to it. Nothing in the root namespace
// routes to or from it.
type External struct {
	IP netip.Addr
	ns netns.NsHandle
}

// NS is the external client's network namespace.
func (e *External) NS() netns.NsHandle { return e.ns }

// Exec runs fn on a thread inside the external client's namespace.
func (e *External) Exec(fn func() error) error { return nsutil.Do(e.ns, fn) }

// ExternalClient returns the lab's external client, creating it on first use; Down removes
// it.
func (l *Lab) ExternalClient() (_ *External, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.external != nil {
		return l.external, nil
	}
	ns, err := nsutil.NewAnon()
	if err != nil {
		return nil, fmt.Errorf("lab: external client namespace: %w", err)
	}
	defer func() {
		if err != nil {
			ns.Close()
		}
	}()
	vpcH, err := netlink.NewHandleAt(l.vpc)
	if err != nil {
		return nil, fmt.Errorf("lab: netlink in the VPC namespace: %w", err)
	}
	defer vpcH.Close()
	la := netlink.NewLinkAttrs()
	la.Name = "ext-client"
	veth := &netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(ns))}
	if err := vpcH.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("lab: create the external client's link in the VPC namespace: %w", err)
	}
	vpcLink, err := vpcH.LinkByName(la.Name)
	if err != nil {
		return nil, err
	}
	gw := netip.MustParseAddr(externalGateway)
	if err := vpcH.AddrAdd(vpcLink, &netlink.Addr{IPNet: netipNet(netip.PrefixFrom(gw, externalPrefix))}); err != nil {
		return nil, fmt.Errorf("lab: address the VPC side of the external link: %w", err)
	}
	if err := vpcH.LinkSetUp(vpcLink); err != nil {
		return nil, err
	}
	ip := netip.MustParseAddr(ExternalClientIP)
	err = nsutil.Do(ns, func() error {
		for _, name := range []string{"lo", "eth0"} {
			lk, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(lk); err != nil {
				return err
			}
		}
		eth, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(eth, &netlink.Addr{IPNet: netipNet(netip.PrefixFrom(ip, externalPrefix))}); err != nil {
			return err
		}
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: gw.AsSlice()}); err != nil {
			return fmt.Errorf("default route via %s: %w", gw, err)
		}
		// A fresh veth drops what it transmits until it is operationally up.
		deadline := time.Now().Add(5 * time.Second)
		for {
			lk, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			if lk.Attrs().OperState == netlink.OperUp {
				return nil
			}
			if time.Now().After(deadline) {
				return errors.New("eth0 not operationally up after 5s")
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("lab: configure the external client's namespace: %w", err)
	}
	l.external = &External{IP: ip, ns: ns}
	return l.external, nil
}

// RouteToNode makes the VPC router send traffic for addr to node n's primary ENI, as the
// cloud does for an address that fronts the node (an SLB's backend, an EIP bound to it): the
// lab's LoadBalancer ingress IPs and externalIPs.
func (l *Lab) RouteToNode(addr netip.Addr, n *Node) error {
	h, err := netlink.NewHandleAt(l.vpc)
	if err != nil {
		return fmt.Errorf("lab: netlink in the VPC namespace: %w", err)
	}
	defer h.Close()
	r := &netlink.Route{Dst: netipNet(netip.PrefixFrom(addr, 32)), Gw: net.ParseIP(n.PrimaryIP)}
	if err := h.RouteReplace(r); err != nil {
		return fmt.Errorf("lab: route %s to %s (%s) in the VPC namespace: %w", addr, n.Name, n.PrimaryIP, err)
	}
	return nil
}
