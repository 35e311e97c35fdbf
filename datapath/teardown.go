package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// PodTeardown is what removing one sandbox's node side needs. CNI DEL and the agent's GC
// both use it, so the two can never disagree on what a sandbox left on the node.
type PodTeardown struct {
	// HostIfName is the host veth (api.HostVethName of the sandbox's container ID and
	// interface name). Empty: there is no veth to remove.
	HostIfName string
	// IP is the sandbox's address, set only while the sandbox still owns it: once released
	// the address may belong to another pod whose rules must stay. Zero: rules are left.
	IP netip.Addr
	// Detach, when set, drops the pod programs and their pins from the veth before it goes.
	Detach func(ifindex int) error
}

// TeardownPod detaches the programs, deletes the host veth (the pod side goes with it) and
// then the address's policy rules. Everything missing is fine, so it can be repeated. A
// Detach failure does not stop it (the veth's deletion detaches the programs anyway; only
// pins may stay) and is returned apart from the teardown's own error.
func TeardownPod(t PodTeardown) (detachErr, err error) {
	if t.HostIfName != "" {
		if l, lerr := netlink.LinkByName(t.HostIfName); lerr == nil && t.Detach != nil {
			detachErr = t.Detach(l.Attrs().Index)
		}
		if derr := DeletePodLink(t.HostIfName); derr != nil {
			err = derr
		}
	}
	if t.IP.IsValid() {
		if rerr := DeletePodRules(t.IP); rerr != nil {
			err = errors.Join(err, fmt.Errorf("delete policy rules of %s: %w", t.IP, rerr))
		}
	}
	return detachErr, err
}

// HostVethOf returns the host veth that routes to podIP: SetupPodLink gives the host side a
// /32 route to the pod, so the route finds the veth of any interface name without state.
// It returns "" when no tern veth routes there.
func HostVethOf(podIP netip.Addr) (string, error) {
	routes, err := retryDump(func() ([]netlink.Route, error) {
		return netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: hostPrefix(podIP), Table: unix.RT_TABLE_MAIN},
			netlink.RT_FILTER_DST|netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return "", fmt.Errorf("list routes to %s: %w", podIP, err)
	}
	for _, r := range routes {
		l, err := netlink.LinkByIndex(r.LinkIndex)
		if err != nil {
			continue
		}
		if l.Type() == "veth" && strings.HasPrefix(l.Attrs().Name, "tern") {
			return l.Attrs().Name, nil
		}
	}
	return "", nil
}
