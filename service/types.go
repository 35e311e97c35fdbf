// Package service says what Kubernetes Services and EndpointSlices mean for load balancing:
// the frontends and their backends (State), computed per Service (Translate, Builder). It
// knows nothing of BPF maps; service/lbmap encodes State into them.
package service

import (
	"fmt"
	"net/netip"
	"slices"
)

// Protocol is an IP protocol number; TCP, UDP and SCTP on one port are separate frontends.
type Protocol uint8

const (
	TCP  Protocol = 6
	UDP  Protocol = 17
	SCTP Protocol = 132
)

func (p Protocol) String() string {
	switch p {
	case TCP:
		return "TCP"
	case UDP:
		return "UDP"
	case SCTP:
		return "SCTP"
	}
	return fmt.Sprintf("proto-%d", uint8(p))
}

// Frontend is one Service port on one address: a cluster IP, a node address (NodePort), a
// LoadBalancer IP or an externalIP.
type Frontend struct {
	Addr  netip.Addr
	Port  uint16
	Proto Protocol
	// Internal marks the cluster-wide twin of an externalTrafficPolicy Local frontend: the
	// backends in-cluster clients (pods, host processes) get at the same address, while
	// external clients get the local ones (kube-proxy's short-circuit of in-cluster traffic).
	Internal bool
}

func (f Frontend) String() string {
	if f.Internal {
		return fmt.Sprintf("%s/%s (in-cluster)", netip.AddrPortFrom(f.Addr, f.Port), f.Proto)
	}
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(f.Addr, f.Port), f.Proto)
}

// Backend is a ready endpoint address with the port the frontend translates to.
type Backend struct {
	Addr netip.Addr
	Port uint16
}

func (b Backend) String() string { return netip.AddrPortFrom(b.Addr, b.Port).String() }

func compareBackends(a, b Backend) int {
	if c := a.Addr.Compare(b.Addr); c != 0 {
		return c
	}
	return int(a.Port) - int(b.Port)
}

// State is the desired load-balancer state: every frontend with its ready backends,
// sorted and without duplicates. A frontend with no backends rejects.
type State map[Frontend][]Backend

func normalize(bs []Backend) []Backend {
	slices.SortFunc(bs, compareBackends)
	return slices.Compact(bs)
}

// Lookup answers what a frontend should hold, and whether it should exist at all.
// State.Lookup and Builder.Desired are Lookups.
type Lookup func(Frontend) ([]Backend, bool)

// Lookup makes a State usable where a Lookup is wanted.
func (s State) Lookup(f Frontend) ([]Backend, bool) {
	bs, ok := s[f]
	return bs, ok
}
