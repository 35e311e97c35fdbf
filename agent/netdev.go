package agent

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/loader"
)

// The netdev programs (loader/netdev.go) go on the node's primary NIC and on every ENI link
// the pool holds: at start for those present, and for an ENI that appears later when its
// first pod is attached (the CNI has configured the ENI's link and policy routing by then,
// datapath.EnsureENI). They masquerade pod traffic leaving the VPC and serve NodePort,
// LoadBalancer IP and externalIP frontends to external clients.

// nodePortLoadConfig turns the netdev path of external frontends on, translating external
// clients' flows to remote backends to the primary NIC's first IPv4 address (kube-proxy
// masquerades them to the node's address too). Without a primary NIC address it stays off
// and says so: pods and host processes still reach NodePorts, external clients do not.
func (a *Agent) nodePortLoadConfig(cfg *loader.Config) {
	addrs := a.NodeAddrs()
	if len(addrs) == 0 {
		a.log.Warn("no IPv4 address on the primary NIC: NodePort, LoadBalancer IP and externalIP frontends are not served to external clients")
		return
	}
	cfg.NodePortAddr = addrs[0]
	a.log.Info("external frontends served on the netdevs", zap.String("snatAddress", addrs[0].String()))
}

// snatPortsLoadConfig makes masquerade and NodePort SNAT keep out of the ports the node's own
// connections get (bpf/lib/portclaim.h). The range is read once: a change of the sysctl
// needs an agent restart.
func (a *Agent) snatPortsLoadConfig(cfg *loader.Config) error {
	r, err := loader.ReadLocalPortRange()
	if err != nil {
		return err
	}
	if !cfg.KeepOutOf(r) {
		a.log.Warn("the node's ephemeral port range leaves masquerade and NodePort SNAT too few ports to keep out of it: a connection of the node's own can meet a translated flow on one wire tuple and hang; narrow net.ipv4.ip_local_port_range (Linux's default is 32768-60999), or with masquerade on set masquerade.portMin so that its range reaches outside it",
			zap.Stringer("ip_local_port_range", r), zap.Int("needed", loader.MinSNATPorts))
		return nil
	}
	a.log.Info("translated flows keep out of the node's ephemeral ports", zap.Stringer("ip_local_port_range", r))
	return nil
}

// NodeAddrs are the node's own IPv4 addresses NodePorts are served on, the primary NIC's
// first: the global addresses of the primary NIC and of the ENI links in the node namespace
// (in ENIIP mode an ENI link usually has none: its addresses are the pods'). kube-proxy's
// default nodePortAddresses is every local address; loopback and link-local ones are left
// out here (a NodePort on 127.0.0.1 needs route_localnet, which kube-proxy users turn off).
// Read when asked: the agent reads it at start, so an address added later needs a restart.
func (a *Agent) NodeAddrs() []netip.Addr {
	var links []int
	if idx, err := primaryNIC(); err == nil {
		links = append(links, idx)
	}
	if pool := a.startedPool(); pool != nil {
		for _, e := range pool.Status().ENIs {
			if idx, err := linkByMAC(e.MAC); err == nil {
				links = append(links, idx)
			}
		}
	}
	var out []netip.Addr
	seen := map[netip.Addr]bool{}
	for _, idx := range links {
		lk, err := netlink.LinkByIndex(idx)
		if err != nil {
			continue
		}
		as, err := netlink.AddrList(lk, netlink.FAMILY_V4)
		if err != nil {
			continue
		}
		for _, ad := range as {
			addr, ok := netip.AddrFromSlice(ad.IP.To4())
			if !ok || !addr.IsGlobalUnicast() || seen[addr] {
				continue
			}
			seen[addr] = true
			out = append(out, addr)
		}
	}
	return out
}

// attachNetdevs attaches the netdev programs to the primary NIC and every ENI of the pool
// whose link is in the node namespace, and clears the pins of interfaces that are gone. A
// failure is logged, not fatal: today the programs only count, and the next pod attach or
// agent start tries again.
func (a *Agent) attachNetdevs(dp *loader.Datapath, pool ipam.Allocator) {
	a.attachMu.Lock()
	defer a.attachMu.Unlock()
	a.sweepNetdevPinsLocked(dp)
	if idx, err := primaryNIC(); err != nil {
		a.log.Warn("netdev programs not attached to the primary NIC", zap.Error(err))
	} else {
		a.attachNetdevLocked(dp, idx, "primary NIC")
	}
	if pool == nil { // IPAM off: no ENI of tern's
		return
	}
	for _, e := range pool.Status().ENIs {
		if e.NodePrimary {
			continue // the primary NIC, attached above (VPC route mode lists it as its ENI)
		}
		idx, err := linkByMAC(e.MAC)
		if err != nil {
			// Not in the guest yet: the first pod on it attaches the programs.
			a.log.Info("ENI link not present yet; netdev programs follow with its first pod", zap.String("eni", e.ID), zap.Error(err))
			continue
		}
		a.attachNetdevLocked(dp, idx, "ENI "+e.ID)
	}
}

// sweepNetdevPinsLocked clears the netdev link pins of interfaces that are gone (an ENI the
// pool detached): the tcx link went with the device, its pin did not. Called with attachMu
// held, at start and after a GC.
func (a *Agent) sweepNetdevPinsLocked(dp *loader.Datapath) {
	pinned, err := dp.NetdevPinned()
	if err != nil {
		a.log.Warn("could not list netdev link pins", zap.Error(err))
		return
	}
	for _, ifindex := range pinned {
		if _, err := netlink.LinkByIndex(ifindex); err == nil {
			continue
		}
		if err := dp.DetachNetdev(ifindex); err != nil {
			a.log.Warn("could not clear the netdev pins of a removed interface", zap.Int("ifindex", ifindex), zap.Error(err))
		}
	}
}

// ensureNetdevFor attaches the netdev programs to the ENI that holds podIP if they are not
// there yet. Called with attachMu held, after the pod's programs are attached.
func (a *Agent) ensureNetdevFor(dp *loader.Datapath, podIP netip.Addr) {
	pool := a.startedPool()
	if pool == nil || !podIP.IsValid() {
		return
	}
	for _, e := range pool.Status().ENIs {
		if !containsAddr(e.IPs, podIP) || e.NodePrimary {
			continue
		}
		idx, err := linkByMAC(e.MAC)
		if err != nil {
			a.log.Warn("netdev programs not attached to a pod's ENI", zap.String("eni", e.ID), zap.Error(err))
			return
		}
		if !dp.NetdevAttached(idx) {
			a.attachNetdevLocked(dp, idx, "ENI "+e.ID)
		}
		return
	}
}

func (a *Agent) attachNetdevLocked(dp *loader.Datapath, ifindex int, what string) {
	a.ensureFQLocked(ifindex, what)
	mode, err := dp.AttachNetdev(ifindex)
	if err != nil {
		a.log.Error("could not attach the netdev programs", zap.String("interface", what), zap.Int("ifindex", ifindex), zap.Error(err))
		return
	}
	a.log.Info("netdev programs attached", zap.String("interface", what), zap.Int("ifindex", ifindex), zap.String("mode", string(mode)))
}

func containsAddr(as []netip.Addr, x netip.Addr) bool {
	for _, a := range as {
		if a == x {
			return true
		}
	}
	return false
}

// primaryNIC is the interface of the main table's IPv4 default route: how the instance
// image configures eth0 (its primary ENI).
func primaryNIC() (int, error) {
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN},
		netlink.RT_FILTER_TABLE)
	if err != nil {
		return 0, fmt.Errorf("list main-table routes to find the primary NIC: %w", err)
	}
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.IP.IsUnspecified() && isZeroMask(r.Dst.Mask)) && r.LinkIndex > 0 {
			return r.LinkIndex, nil
		}
	}
	return 0, errors.New("no IPv4 default route in the main table: cannot tell the primary NIC")
}

func isZeroMask(m net.IPMask) bool {
	ones, _ := m.Size()
	return ones == 0
}

// linkByMAC is the ifindex of the link with the given MAC, without waiting.
func linkByMAC(mac string) (int, error) {
	hw, err := net.ParseMAC(mac)
	if err != nil {
		return 0, fmt.Errorf("bad ENI MAC %q: %w", mac, err)
	}
	links, err := netlink.LinkList()
	if err != nil {
		return 0, fmt.Errorf("list links to find MAC %s: %w", mac, err)
	}
	for _, l := range links {
		if bytes.Equal(l.Attrs().HardwareAddr, hw) {
			return l.Attrs().Index, nil
		}
	}
	return 0, fmt.Errorf("no link with MAC %s in the node namespace", mac)
}
