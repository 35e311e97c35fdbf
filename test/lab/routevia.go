//go:build linux

package lab

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// routeThroughTable is the VPC router's routing table for RouteExternalThrough.
const routeThroughTable = 250

// RouteExternalThrough makes the VPC router send everything from and to the external host h
// through node n, as a plain IP router: h's packets to any VPC address go to n first, n
// forwards them back to the router (its default route), and replies to h take the same
// detour. Benchmarks use it as the baseline of a NodePort path to a pod on another node: the
// same hops as the NodePort flow, without a Service. Nothing in the root namespace changes;
// the rules and the table live in the VPC namespace and go with it.
func (l *Lab) RouteExternalThrough(h *ExternalHost, n *Node) error {
	vh, err := netlink.NewHandleAt(l.vpc)
	if err != nil {
		return fmt.Errorf("lab: netlink in the VPC namespace: %w", err)
	}
	defer vh.Close()
	nodeIP := net.ParseIP(n.PrimaryIP)
	routes, err := vh.RouteGet(nodeIP)
	if err != nil || len(routes) == 0 {
		return fmt.Errorf("lab: the VPC router's route to %s (%s): %v", n.Name, n.PrimaryIP, err)
	}
	toNode := routes[0].LinkIndex
	hostNet := netipNet(netip.PrefixFrom(h.Addr, 24).Masked())
	if err := vh.RouteReplace(&netlink.Route{Table: routeThroughTable, Dst: netipNet(netip.MustParsePrefix("0.0.0.0/0")),
		Gw: nodeIP, LinkIndex: toNode, Flags: int(netlink.FLAG_ONLINK)}); err != nil {
		return fmt.Errorf("lab: default route via %s in the VPC router's table %d: %w", n.Name, routeThroughTable, err)
	}
	// What comes back from the node is routed normally (else it would loop); the rest of
	// h's traffic, either way, goes to the node.
	nodeLink, err := vh.LinkByIndex(toNode)
	if err != nil {
		return fmt.Errorf("lab: the VPC router's link to %s: %w", n.Name, err)
	}
	back := netlink.NewRule()
	back.Priority, back.IifName, back.Table = 90, nodeLink.Attrs().Name, 254
	from := netlink.NewRule()
	from.Priority, from.Src, from.Table = 91, hostNet, routeThroughTable
	to := netlink.NewRule()
	to.Priority, to.Dst, to.Table = 92, hostNet, routeThroughTable
	for _, r := range []*netlink.Rule{back, from, to} {
		if err := vh.RuleAdd(r); err != nil {
			return fmt.Errorf("lab: rule %v in the VPC namespace: %w", r, err)
		}
	}
	return nil
}
