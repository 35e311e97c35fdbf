package agent

import (
	"fmt"
	"strings"

	"github.com/vishvananda/netlink"
)

// checkPodVeth makes sure ifindex names a host veth tern-cni made in the agent's namespace
// (the node's): the pod programs redirect and rewrite traffic, and attached to the loopback
// or an uplink they would break the node.
func checkPodVeth(ifindex int) error {
	if ifindex <= 0 {
		return fmt.Errorf("ifIndex %d is not a valid interface index (want the host veth's, > 0)", ifindex)
	}
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return fmt.Errorf("ifIndex %d: no such interface in the node's network namespace: %w", ifindex, err)
	}
	name := l.Attrs().Name
	if l.Type() != "veth" || !strings.HasPrefix(name, "tern") {
		return fmt.Errorf("ifIndex %d is %s (type %s), not a pod's host veth (a veth named tern…): refusing to attach the pod programs",
			ifindex, name, l.Type())
	}
	return nil
}
