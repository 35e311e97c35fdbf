package agent

import (
	"fmt"
	"strings"

	"github.com/vishvananda/netlink"
)

// checkPodVeth makes sure ifindex names a host veth tern-cni made in the agent's namespace
// (the node's): the pod programs redirect and rewrite traffic, and attached to the loopback
// or an uplink they would break the node. A chained sandbox's veth was made by another
// plugin and may have any name: it must still be a veth whose peer is in another namespace.
func checkPodVeth(ifindex int, chained bool) error {
	if ifindex <= 0 {
		return fmt.Errorf("ifIndex %d is not a valid interface index (want the host veth's, > 0)", ifindex)
	}
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return fmt.Errorf("ifIndex %d: no such interface in the node's network namespace: %w", ifindex, err)
	}
	name := l.Attrs().Name
	if chained {
		if l.Type() != "veth" {
			return fmt.Errorf("ifIndex %d is %s (type %s), not a veth: in chaining mode tern attaches to the host side of the veth the previous plugin made (ptp, bridge's veth, …)",
				ifindex, name, l.Type())
		}
		if l.Attrs().NetNsID < 0 {
			return fmt.Errorf("ifIndex %d (%s) is a veth whose peer is in the node's own namespace, not a pod's: refusing to attach the pod programs", ifindex, name)
		}
		return nil
	}
	if l.Type() != "veth" || !strings.HasPrefix(name, "tern") {
		return fmt.Errorf("ifIndex %d is %s (type %s), not a pod's host veth (a veth named tern…): refusing to attach the pod programs",
			ifindex, name, l.Type())
	}
	return nil
}
