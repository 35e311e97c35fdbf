//go:build linux

package ecsemu

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap/zaptest"

	"github.com/tern-net/tern/datapath"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
)

// newTrunkLab is newLab with trunking on ecs.g7.large (3 member ENIs per node).
func newTrunkLab(t *testing.T) *lab {
	testutil.RequirePrivileged(t)
	l := &lab{vpc: testutil.NewNetNS(t), n1: testutil.NewNetNS(t), n2: testutil.NewNetNS(t)}
	cfg := TestConfig()
	cfg.SetTrunking("ecs.g7.large", 6)
	cfg.AddInstance("i-test-0002", "ecs.g7.large", "vsw-test-a", "192.168.1.11")
	cfg.Delays = TransitionDelays{Attach: Duration(20 * time.Millisecond), Detach: Duration(20 * time.Millisecond), MemberAttach: Duration(10 * time.Millisecond)}
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

// addTrunkPod wires a pod namespace to node ns the way tern wires a pod (veth, /32, default
// via 169.254.1.1 onlink with a permanent neighbour, "to podIP → main", "from podIP → table")
// and returns the pod's namespace.
func addTrunkPod(t *testing.T, node netns.NsHandle, h *netlink.Handle, podIP string, table int) netns.NsHandle {
	t.Helper()
	pod := testutil.NewNetNS(t)
	la := netlink.NewLinkAttrs()
	la.Name = "tp1"
	must(t, h.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(pod)}))
	host, err := h.LinkByName("tp1")
	must(t, err)
	must(t, h.LinkSetUp(host))
	ph, err := netlink.NewHandleAt(pod)
	must(t, err)
	t.Cleanup(ph.Close)
	eth0, err := ph.LinkByName("eth0")
	must(t, err)
	must(t, ph.AddrAdd(eth0, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(podIP), Mask: net.CIDRMask(32, 32)}}))
	must(t, ph.LinkSetUp(eth0))
	must(t, waitOperUp(ph, "eth0"))
	must(t, waitOperUp(h, "tp1"))
	gw := net.ParseIP("169.254.1.1")
	must(t, ph.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: &net.IPNet{IP: gw, Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK}))
	must(t, ph.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: gw, Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}}))
	must(t, ph.NeighSet(&netlink.Neigh{LinkIndex: eth0.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT, IP: gw, HardwareAddr: host.Attrs().HardwareAddr}))
	must(t, h.RouteAdd(&netlink.Route{LinkIndex: host.Attrs().Index, Dst: &net.IPNet{IP: net.ParseIP(podIP), Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK}))
	rule := netlink.NewRule()
	rule.Src = &net.IPNet{IP: net.ParseIP(podIP), Mask: net.CIDRMask(32, 32)}
	rule.Table = table
	rule.Priority = 2048
	must(t, h.RuleAdd(rule))
	setSysctl(t, node, map[string]string{"net/ipv4/ip_forward": "1", "net/ipv4/conf/tp1/rp_filter": "0"})
	return pod
}

// TestTrunkMemberPodTalksThroughItsVLAN: a pod on a member ENI of node 1 reaches node 2
// across the emulated VPC only because its packets carry the member's VLAN on the trunk link
// and its VLAN's frames are untagged on the way back. Without the tag the VPC's source check
// drops it; with another member's VLAN too. Detach leaves nothing in the VPC.
func TestTrunkMemberPodTalksThroughItsVLAN(t *testing.T) {
	l := newTrunkLab(t)
	const inst = "i-test-0001"

	tr := createTyped(t, l.c, TypeTrunk)
	must(t, attach(t, l.c, inst, tr.NetworkInterfaceId))
	waitStatus(t, l.c, tr.NetworkInterfaceId, StatusInUse)
	// A first member takes VLAN 1, so the pod's member has VLAN 2 and a wrong tag is testable.
	other := createTyped(t, l.c, TypeSecondary)
	must(t, attachMember(l.c, inst, other.NetworkInterfaceId, tr.NetworkInterfaceId))
	m := createTyped(t, l.c, TypeSecondary)
	must(t, attachMember(l.c, inst, m.NetworkInterfaceId, tr.NetworkInterfaceId))
	waitStatus(t, l.c, m.NetworkInterfaceId, StatusInUse)
	got := describeENI(t, l.c, m.NetworkInterfaceId)
	vlan, podIP := got.Attachment.DeviceIndex, got.PrivateIpAddress
	if vlan != 2 {
		t.Fatalf("member VLAN %d, want 2", vlan)
	}
	if _, ok := linkByMAC(l.h1, m.MacAddress); ok {
		t.Fatal("a member ENI got a link of its own in the node")
	}
	trunkLink, ok := linkByMAC(l.h1, tr.MacAddress)
	if !ok {
		t.Fatalf("no link with the trunk's MAC %s on node 1", tr.MacAddress)
	}
	configureENI(t, l.n1, l.h1, trunkLink, tr.PrivateIpAddress, "192.168.1.253", 1001)
	pod := addTrunkPod(t, l.n1, l.h1, podIP, 1001)

	tp, err := datapath.LoadTrunk("")
	must(t, err)
	t.Cleanup(func() {
		if err := tp.Close(); err != nil {
			t.Errorf("close trunk programs: %v", err)
		}
	})
	idx := trunkLink.Attrs().Index
	must(t, nsutil.Do(l.n1, func() error { return tp.Attach(idx) }))

	serveEcho(t, l.n2, "192.168.1.11:7100")
	pod4 := netip.MustParseAddr(podIP)

	// No tag: the VPC takes the member's address on the trunk's link for a spoof.
	if err := dialEchoQuick(pod, podIP, "192.168.1.11:7100"); err == nil {
		t.Fatal("an untagged member pod reached node 2: the VPC's per-VLAN source check is missing")
	}
	// Another member's VLAN: dropped too.
	must(t, tp.AddPod(pod4, idx, 1))
	if err := dialEchoQuick(pod, podIP, "192.168.1.11:7100"); err == nil {
		t.Fatal("a member pod reached node 2 with another member's VLAN")
	}
	must(t, tp.DelPod(pod4, idx, 1))

	must(t, tp.AddPod(pod4, idx, vlan))
	must(t, dialEcho(pod, podIP, "192.168.1.11:7100"))
	st, err := tp.Stats()
	must(t, err)
	if st.Tagged == 0 || st.Untagged == 0 {
		t.Fatalf("trunk stats %+v: want tagged and untagged packets", st)
	}
	// The node's own traffic on the trunk link is untagged and unaffected.
	serveEcho(t, l.n2, "192.168.1.11:7101")
	must(t, dialEcho(l.n1, tr.PrivateIpAddress, "192.168.1.11:7101"))

	// Detach the members, then the trunk: the VPC keeps no route, neighbour or VLAN of theirs.
	for _, id := range []string{m.NetworkInterfaceId, other.NetworkInterfaceId} {
		must(t, detachMember(l.c, inst, id, tr.NetworkInterfaceId))
		waitStatus(t, l.c, id, StatusAvailable)
	}
	routes, err := l.vpcH.RouteList(nil, netlink.FAMILY_V4)
	must(t, err)
	for _, r := range routes {
		if r.Dst != nil && r.Dst.IP.String() == podIP {
			t.Fatalf("VPC still routes the detached member's %s: %v", podIP, r)
		}
	}
	if err := dialEchoQuick(pod, podIP, "192.168.1.11:7100"); err == nil {
		t.Fatal("the pod still reaches node 2 after its member ENI was detached")
	}
	must(t, tp.DelPod(pod4, idx, vlan))
	must(t, detach(l.c, inst, tr.NetworkInterfaceId))
	waitStatus(t, l.c, tr.NetworkInterfaceId, StatusAvailable)
	if _, err := l.vpcH.LinkByName(VPCLinkName(tr.NetworkInterfaceId)); err == nil {
		t.Fatal("the VPC still has the detached trunk's veth")
	}
}
