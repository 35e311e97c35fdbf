// Package datapath is tern's netlink plumbing: pod veths with their addresses, routes and
// neighbours, policy routing through ENIs, and the sysctls a node needs. It decides
// nothing; callers pass in what to build.
package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/nsutil"
)

// PodGateway is the link-local next hop every pod routes through. It is not configured
// anywhere: the pod has a permanent neighbour entry mapping it to the host veth's MAC, so
// there is no ARP and no proxy ARP (as Terway and Cilium do).
var PodGateway = netip.MustParseAddr("169.254.1.1")

// PodLink describes a pod's veth to create.
type PodLink struct {
	HostIfName string // host side, in the caller's (node) namespace
	PodIfName  string // inside the pod, usually eth0
	PodNS      netns.NsHandle
	PodIP      netip.Addr
	MTU        int
}

// PodLinkResult is what was built.
type PodLinkResult struct {
	HostIndex int
	HostMAC   net.HardwareAddr
	PodMAC    net.HardwareAddr
}

// SetupPodLink creates the veth pair from the calling thread's namespace (the node) into
// the pod namespace and configures both ends: the pod gets PodIP/32, a default route via
// PodGateway onlink and a permanent neighbour for it; the host side gets a /32 route to the
// pod. Callers run it on a thread locked to the node namespace.
func SetupPodLink(p PodLink) (PodLinkResult, error) {
	var res PodLinkResult
	if !p.PodIP.Is4() {
		return res, fmt.Errorf("pod IP %s: only IPv4 is supported", p.PodIP)
	}
	if p.PodIfName == "" {
		p.PodIfName = "eth0"
	}
	attrs := netlink.NewLinkAttrs()
	attrs.Name = p.HostIfName
	if p.MTU > 0 {
		attrs.MTU = p.MTU
	}
	// The peer is created under a temporary name straight in the pod namespace, then
	// renamed: the pod may already have an eth0-named link only inside its own namespace.
	tmpPeer := "tmp" + p.HostIfName
	if len(tmpPeer) > 15 {
		tmpPeer = tmpPeer[:15]
	}
	veth := &netlink.Veth{LinkAttrs: attrs, PeerName: tmpPeer, PeerNamespace: netlink.NsFd(p.PodNS)}
	if err := netlink.LinkAdd(veth); err != nil {
		return res, fmt.Errorf("create veth %s: %w", p.HostIfName, err)
	}
	host, err := netlink.LinkByName(p.HostIfName)
	if err != nil {
		return res, fmt.Errorf("find new veth %s: %w", p.HostIfName, err)
	}
	res.HostIndex = host.Attrs().Index
	res.HostMAC = host.Attrs().HardwareAddr
	if err := disableIPv6(p.HostIfName); err != nil {
		return res, err
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return res, fmt.Errorf("set %s up: %w", p.HostIfName, err)
	}

	err = nsutil.Do(p.PodNS, func() error {
		peer, err := netlink.LinkByName(tmpPeer)
		if err != nil {
			return fmt.Errorf("find pod end %s: %w", tmpPeer, err)
		}
		if err := netlink.LinkSetName(peer, p.PodIfName); err != nil {
			return fmt.Errorf("rename pod end to %s: %w", p.PodIfName, err)
		}
		res.PodMAC = peer.Attrs().HardwareAddr
		if err := disableIPv6(p.PodIfName); err != nil {
			return err
		}
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.PodIP.AsSlice(), Mask: net.CIDRMask(32, 32)}}
		if err := netlink.AddrAdd(peer, addr); err != nil {
			return fmt.Errorf("add %s to pod %s: %w", p.PodIP, p.PodIfName, err)
		}
		if err := netlink.LinkSetUp(peer); err != nil {
			return fmt.Errorf("set pod %s up: %w", p.PodIfName, err)
		}
		if lo, err := netlink.LinkByName("lo"); err == nil {
			netlink.LinkSetUp(lo)
		}
		gw := PodGateway.AsSlice()
		if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: peer.Attrs().Index, Family: unix.AF_INET,
			State: netlink.NUD_PERMANENT, IP: gw, HardwareAddr: res.HostMAC}); err != nil {
			return fmt.Errorf("add permanent neighbour %s in pod: %w", PodGateway, err)
		}
		if err := netlink.RouteReplace(&netlink.Route{LinkIndex: peer.Attrs().Index, Scope: netlink.SCOPE_LINK,
			Dst: &net.IPNet{IP: gw, Mask: net.CIDRMask(32, 32)}}); err != nil {
			return fmt.Errorf("add route to %s in pod: %w", PodGateway, err)
		}
		if err := netlink.RouteReplace(&netlink.Route{LinkIndex: peer.Attrs().Index, Gw: gw,
			Flags: int(netlink.FLAG_ONLINK)}); err != nil {
			return fmt.Errorf("add default route in pod: %w", err)
		}
		return WaitOperUp(p.PodIfName, 5*time.Second)
	})
	if err != nil {
		netlink.LinkDel(host)
		return res, err
	}
	if err := netlink.RouteReplace(&netlink.Route{LinkIndex: res.HostIndex, Scope: netlink.SCOPE_LINK,
		Dst: &net.IPNet{IP: p.PodIP.AsSlice(), Mask: net.CIDRMask(32, 32)}}); err != nil {
		netlink.LinkDel(host)
		return res, fmt.Errorf("add host route to pod %s: %w", p.PodIP, err)
	}
	if err := WaitOperUp(p.HostIfName, 5*time.Second); err != nil {
		netlink.LinkDel(host)
		return res, err
	}
	return res, nil
}

// DeletePodLink removes the host side of a pod veth (the pod side goes with it). A missing
// link is not an error, so teardown can be repeated.
func DeletePodLink(hostIfName string) error {
	l, err := netlink.LinkByName(hostIfName)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("find %s: %w", hostIfName, err)
	}
	if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete %s: %w", hostIfName, err)
	}
	return nil
}

// WaitOperUp waits until a link's operstate is UP. A fresh veth drops what it transmits
// before that, and a lost first ARP costs a one-second retry.
func WaitOperUp(name string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		l, err := netlink.LinkByName(name)
		if err == nil && l.Attrs().OperState == netlink.OperUp {
			return nil
		}
		if time.Now().After(deadline) {
			state := "unknown"
			if err == nil {
				state = l.Attrs().OperState.String()
			}
			return fmt.Errorf("link %s not up after %s (operstate %s)", name, timeout, state)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// EnvProcSys names the sysctl tree SetSysctl writes instead of /proc/sys. A container
// runtime mounts /proc/sys read-only in a container that is not privileged, so the
// DaemonSet mounts the host's /proc/sys/net at /host/proc/sys/net (as Cilium does) and sets
// TERN_PROC_SYS=/host/proc/sys. Every key the agent writes is under net., and /proc/sys/net
// resolves in the writing thread's network namespace whatever the mount point, so per-pod
// keys still land in the pod's namespace.
const EnvProcSys = "TERN_PROC_SYS"

// SetSysctl writes a value under /proc/sys (or $TERN_PROC_SYS), in the calling thread's
// network namespace for net.* keys.
func SetSysctl(key, value string) error {
	root := os.Getenv(EnvProcSys)
	if root == "" {
		root = "/proc/sys"
	}
	p := filepath.Join(root, filepath.FromSlash(replaceDots(key)))
	if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
		return fmt.Errorf("set sysctl %s=%s: %w", key, value, err)
	}
	return nil
}

func replaceDots(key string) string {
	b := []byte(key)
	for i, c := range b {
		if c == '.' {
			b[i] = '/'
		}
	}
	return string(b)
}

func disableIPv6(ifname string) error {
	// Pods are IPv4-only for now; without this every veth sends router solicitations.
	err := SetSysctl("net.ipv6.conf."+ifname+".disable_ipv6", "1")
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// PrepareNode sets the sysctls a node namespace needs to route for its pods.
func PrepareNode() error {
	for k, v := range map[string]string{
		"net.ipv4.ip_forward":                  "1",
		"net.ipv4.conf.all.rp_filter":          "0",
		"net.ipv4.conf.default.rp_filter":      "0",
		"net.ipv4.conf.all.send_redirects":     "0",
		"net.ipv4.conf.default.send_redirects": "0",
	} {
		if err := SetSysctl(k, v); err != nil {
			return err
		}
	}
	return nil
}
