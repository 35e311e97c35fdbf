//go:build linux

package ecsemu

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap/zaptest"

	"github.com/aliyun/alibaba-cloud-sdk-go/services/ecs"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
)

// lab is a VPC namespace and two node namespaces wired by a NetnsSDN-backed emulator.
type lab struct {
	e            *Emulator
	c            *ecs.Client
	vpc, n1, n2  netns.NsHandle
	vpcH, h1, h2 *netlink.Handle
}

func newLab(t *testing.T) *lab {
	testutil.RequirePrivileged(t)
	l := &lab{vpc: testutil.NewNetNS(t), n1: testutil.NewNetNS(t), n2: testutil.NewNetNS(t)}
	cfg := TestConfig()
	cfg.AddInstance("i-test-0002", "ecs.g7.large", "vsw-test-a", "192.168.1.11")
	cfg.Delays = TransitionDelays{Attach: Duration(20 * time.Millisecond), Detach: Duration(20 * time.Millisecond)}
	sdn, err := NewNetnsSDN(l.vpc, map[string]netns.NsHandle{"i-test-0001": l.n1, "i-test-0002": l.n2}, zaptest.NewLogger(t))
	must(t, err)
	t.Cleanup(func() {
		if err := sdn.Close(); err != nil {
			t.Errorf("close SDN: %v", err)
		}
	})
	var addr string
	l.e, addr = NewTestServer(t, cfg, WithSDN(sdn), WithLogger(zaptest.NewLogger(t)))
	l.c, _ = NewTestClients(t, addr)
	for _, p := range []struct {
		ns netns.NsHandle
		h  **netlink.Handle
	}{{l.vpc, &l.vpcH}, {l.n1, &l.h1}, {l.n2, &l.h2}} {
		h, err := netlink.NewHandleAt(p.ns)
		must(t, err)
		t.Cleanup(h.Close)
		*p.h = h
	}
	return l
}

// serveEcho listens on ip:port inside ns (the socket stays in the namespace it was made in)
// and echoes one line per connection.
func serveEcho(t *testing.T, ns netns.NsHandle, hostPort string) {
	t.Helper()
	var ln net.Listener
	must(t, nsutil.Do(ns, func() error {
		var err error
		ln, err = net.Listen("tcp4", hostPort)
		return err
	}))
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
}

// dialEcho connects from inside ns (from local, if set) and checks the echo.
func dialEcho(ns netns.NsHandle, local, remote string) error {
	return nsutil.Do(ns, func() error {
		d := net.Dialer{Timeout: 5 * time.Second}
		if local != "" {
			d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(local)}
		}
		c, err := d.Dial("tcp4", remote)
		if err != nil {
			return fmt.Errorf("dial %s from %q: %w", remote, local, err)
		}
		defer c.Close()
		msg := []byte("hello through the VPC\n")
		if _, err := c.Write(msg); err != nil {
			return err
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil {
			return fmt.Errorf("read echo from %s: %w", remote, err)
		}
		if !bytes.Equal(got, msg) {
			return fmt.Errorf("echo from %s = %q", remote, got)
		}
		return nil
	})
}

func linkByMAC(h *netlink.Handle, mac string) (netlink.Link, bool) {
	links, err := h.LinkList()
	if err != nil {
		return nil, false
	}
	for _, l := range links {
		if l.Attrs().HardwareAddr.String() == mac {
			return l, true
		}
	}
	return nil, false
}

func rxPackets(t *testing.T, h *netlink.Handle, name string) uint64 {
	t.Helper()
	l, err := h.LinkByName(name)
	must(t, err)
	return l.Attrs().Statistics.RxPackets
}

func setSysctl(t *testing.T, ns netns.NsHandle, kv map[string]string) {
	t.Helper()
	must(t, nsutil.Do(ns, func() error {
		for k, v := range kv {
			if err := os.WriteFile(filepath.Join("/proc/sys", k), []byte(v), 0o644); err != nil {
				return err
			}
		}
		return nil
	}))
}

// configureENI does what an agent does with a fresh ENI link: bring it up, put the secondary
// address on it as a /32, and route traffic from that address via the vSwitch gateway in its
// own table.
func configureENI(t *testing.T, ns netns.NsHandle, h *netlink.Handle, link netlink.Link, ip, gw string, table int) {
	t.Helper()
	setSysctl(t, ns, map[string]string{
		"net/ipv4/conf/all/rp_filter":                       "0",
		"net/ipv4/conf/" + link.Attrs().Name + "/rp_filter": "0",
	})
	must(t, h.LinkSetUp(link))
	must(t, waitOperUp(h, link.Attrs().Name))
	must(t, h.AddrAdd(link, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(ip), Mask: net.CIDRMask(32, 32)}}))
	idx := link.Attrs().Index
	must(t, h.RouteAdd(&netlink.Route{LinkIndex: idx, Table: table, Scope: netlink.SCOPE_LINK,
		Dst: &net.IPNet{IP: net.ParseIP(gw), Mask: net.CIDRMask(32, 32)}}))
	must(t, h.RouteAdd(&netlink.Route{LinkIndex: idx, Table: table, Gw: net.ParseIP(gw),
		Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}}))
	rule := netlink.NewRule()
	rule.Src = &net.IPNet{IP: net.ParseIP(ip), Mask: net.CIDRMask(32, 32)}
	rule.Table = table
	rule.Priority = 2048
	must(t, h.RuleAdd(rule))
}

func TestNetnsSDNPrimaryENIsRouteThroughVPC(t *testing.T) {
	l := newLab(t)
	s := l.e.Snapshot()
	p1, _ := s.ENI(s.Instances[0].PrimaryENI)

	eth0, err := l.h1.LinkByName("eth0")
	must(t, err)
	if eth0.Attrs().HardwareAddr.String() != p1.MAC || eth0.Attrs().OperState != netlink.OperUp {
		t.Fatalf("node1 eth0 MAC %s state %s, want %s up", eth0.Attrs().HardwareAddr, eth0.Attrs().OperState, p1.MAC)
	}
	addrs, err := l.h1.AddrList(eth0, netlink.FAMILY_V4)
	must(t, err)
	if len(addrs) != 1 || addrs[0].IPNet.String() != "192.168.1.10/24" {
		t.Fatalf("node1 eth0 addresses %v, want 192.168.1.10/24", addrs)
	}

	serveEcho(t, l.n2, "192.168.1.11:7000")
	before := rxPackets(t, l.vpcH, VPCLinkName(p1.ID))
	must(t, dialEcho(l.n1, "", "192.168.1.11:7000"))
	if after := rxPackets(t, l.vpcH, VPCLinkName(p1.ID)); after <= before {
		t.Fatalf("VPC side of node1's eth0 received no packets (%d → %d): traffic did not cross the VPC", before, after)
	}
	// The node resolved its peer to the VPC router's MAC (proxy ARP), not to node2's eth0.
	vpcSide, err := l.vpcH.LinkByName(VPCLinkName(p1.ID))
	must(t, err)
	neighs, err := l.h1.NeighList(eth0.Attrs().Index, netlink.FAMILY_V4)
	must(t, err)
	found := false
	for _, n := range neighs {
		if n.IP.String() == "192.168.1.11" {
			found = true
			if n.HardwareAddr.String() != vpcSide.Attrs().HardwareAddr.String() {
				t.Fatalf("node1 resolved 192.168.1.11 to %s, want the VPC side %s", n.HardwareAddr, vpcSide.Attrs().HardwareAddr)
			}
		}
	}
	if !found {
		t.Fatalf("node1 has no neighbour entry for 192.168.1.11: %v", neighs)
	}
}

func TestNetnsSDNSecondaryENIThroughSDK(t *testing.T) {
	l := newLab(t)
	type node struct {
		inst string
		ns   netns.NsHandle
		h    *netlink.Handle
		eni  *ecs.CreateNetworkInterfaceResponse
		ip   string
	}
	nodes := []*node{{inst: "i-test-0001", ns: l.n1, h: l.h1}, {inst: "i-test-0002", ns: l.n2, h: l.h2}}
	for _, n := range nodes {
		n.eni = createENI(t, l.c, "vsw-test-b", nil)
		must(t, attach(t, l.c, n.inst, n.eni.NetworkInterfaceId))
	}
	for _, n := range nodes {
		waitStatus(t, l.c, n.eni.NetworkInterfaceId, StatusInUse)
		resp, err := assignN(l.c, n.eni.NetworkInterfaceId, 1, "")
		must(t, err)
		n.ip = resp.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress[0]
		link, ok := linkByMAC(n.h, n.eni.MacAddress)
		if !ok {
			t.Fatalf("no link with the ENI's MAC %s in %s's namespace", n.eni.MacAddress, n.inst)
		}
		if link.Attrs().Name != "eth1" || link.Attrs().Flags&net.FlagUp != 0 {
			t.Fatalf("ENI link %s flags %v, want eth1 left down", link.Attrs().Name, link.Attrs().Flags)
		}
		configureENI(t, n.ns, n.h, link, n.ip, "192.168.2.253", 1001)
	}

	serveEcho(t, l.n2, nodes[1].ip+":7001")
	vpcSide := VPCLinkName(nodes[0].eni.NetworkInterfaceId)
	before := rxPackets(t, l.vpcH, vpcSide)
	must(t, dialEcho(l.n1, nodes[0].ip, nodes[1].ip+":7001"))
	if after := rxPackets(t, l.vpcH, vpcSide); after <= before {
		t.Fatalf("the VPC side of node1's ENI received no packets (%d → %d)", before, after)
	}

	if r := vpcRoutes(t, l.vpcH, nodes[1].eni.NetworkInterfaceId); !r[nodes[1].ip] {
		t.Fatalf("VPC routes %v on node2's ENI veth, want %s among them", r, nodes[1].ip)
	}

	// Detach removes the link from the node and the routes from the VPC.
	must(t, detach(l.c, "i-test-0002", nodes[1].eni.NetworkInterfaceId))
	waitStatus(t, l.c, nodes[1].eni.NetworkInterfaceId, StatusAvailable)
	if _, ok := linkByMAC(l.h2, nodes[1].eni.MacAddress); ok {
		t.Fatalf("node2 still has the detached ENI's link")
	}
	if _, err := l.vpcH.LinkByName(VPCLinkName(nodes[1].eni.NetworkInterfaceId)); err == nil {
		t.Fatalf("the VPC still has the detached ENI's veth")
	}
	routes, err := l.vpcH.RouteList(nil, netlink.FAMILY_V4)
	must(t, err)
	for _, r := range routes {
		if r.Dst != nil && r.Dst.IP.String() == nodes[1].ip {
			t.Fatalf("VPC still routes %s after detach: %v", nodes[1].ip, r)
		}
	}
	if err := dialEchoQuick(l.n1, nodes[0].ip, nodes[1].ip+":7001"); err == nil {
		t.Fatalf("dial to the detached ENI's address succeeded")
	}
}

// dialEchoQuick fails fast: with the route gone the VPC answers with ICMP unreachable or drops.
func dialEchoQuick(ns netns.NsHandle, local, remote string) error {
	return nsutil.Do(ns, func() error {
		d := net.Dialer{Timeout: 500 * time.Millisecond, LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}}
		c, err := d.Dial("tcp4", remote)
		if err == nil {
			c.Close()
		}
		return err
	})
}

// vpcRoutes lists the destinations the VPC routes to an ENI's veth.
func vpcRoutes(t *testing.T, h *netlink.Handle, eniID string) map[string]bool {
	t.Helper()
	link, err := h.LinkByName(VPCLinkName(eniID))
	must(t, err)
	routes, err := h.RouteList(link, netlink.FAMILY_V4)
	must(t, err)
	out := map[string]bool{}
	for _, r := range routes {
		if r.Dst != nil {
			out[r.Dst.IP.String()] = true
		}
	}
	return out
}

func TestNetnsSDNUnassignRemovesRoute(t *testing.T) {
	l := newLab(t)
	id := createENI(t, l.c, "vsw-test-b", nil).NetworkInterfaceId
	must(t, attach(t, l.c, "i-test-0001", id))
	waitStatus(t, l.c, id, StatusInUse)
	resp, err := assignN(l.c, id, 2, "")
	must(t, err)
	ips := resp.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress
	routed := func() map[string]bool { return vpcRoutes(t, l.vpcH, id) }
	if r := routed(); !r[ips[0]] || !r[ips[1]] {
		t.Fatalf("VPC routes on the ENI veth %v, want %v", r, ips)
	}
	un := ecs.CreateUnassignPrivateIpAddressesRequest()
	un.NetworkInterfaceId = id
	un.PrivateIpAddress = &[]string{ips[0]}
	_, err = l.c.UnassignPrivateIpAddresses(un)
	must(t, err)
	if r := routed(); r[ips[0]] || !r[ips[1]] {
		t.Fatalf("after unassigning %s the VPC routes %v", ips[0], r)
	}
}

func TestNetnsSDNCloseRemovesLinks(t *testing.T) {
	testutil.RequirePrivileged(t)
	vpc, n1 := testutil.NewNetNS(t), testutil.NewNetNS(t)
	sdn, err := NewNetnsSDN(vpc, map[string]netns.NsHandle{"i-test-0001": n1}, nil)
	must(t, err)
	defer sdn.Close()
	e, err := New(TestConfig(), WithSDN(sdn))
	must(t, err)
	h, err := netlink.NewHandleAt(n1)
	must(t, err)
	defer h.Close()
	if _, err := h.LinkByName("eth0"); err != nil {
		t.Fatalf("node has no eth0 after New: %v", err)
	}
	must(t, e.Close())
	if _, err := h.LinkByName("eth0"); err == nil {
		t.Fatalf("eth0 survived Emulator.Close")
	}
}

func TestNetnsSDNFromConfigPaths(t *testing.T) {
	testutil.RequirePrivileged(t)
	vpc, n1 := testutil.NewNetNS(t), testutil.NewNetNS(t)
	cfg := TestConfig()
	cfg.VPC.NetNSPath = fmt.Sprintf("/proc/self/fd/%d", int(vpc))
	cfg.Instances[0].NetNSPath = fmt.Sprintf("/proc/self/fd/%d", int(n1))
	sdn, err := NewNetnsSDNFromConfig(cfg, nil)
	must(t, err)
	e, err := New(cfg, WithSDN(sdn))
	must(t, err)
	h, err := netlink.NewHandleAt(n1)
	must(t, err)
	defer h.Close()
	eth0, err := h.LinkByName("eth0")
	must(t, err)
	routes, err := h.RouteList(eth0, netlink.FAMILY_V4)
	must(t, err)
	gw := ""
	for _, r := range routes {
		if r.Dst == nil || r.Dst.IP.IsUnspecified() {
			gw = r.Gw.String()
		}
	}
	if gw != "192.168.1.253" {
		t.Fatalf("node default route via %q, want 192.168.1.253 (routes %v)", gw, routes)
	}
	must(t, e.Close())
	must(t, sdn.Close())
	cfg.Instances[0].NetNSPath = "/nonexistent/ns"
	if _, err := NewNetnsSDNFromConfig(cfg, nil); err == nil || !strings.Contains(err.Error(), "i-test-0001") {
		t.Fatalf("a missing namespace path gave %v, want an error naming the instance", err)
	}
}
