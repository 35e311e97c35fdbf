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
	tp, err := datapath.LoadTrunk("")
	must(t, err)
	t.Cleanup(func() {
		if err := tp.Close(); err != nil {
			t.Errorf("close trunk programs: %v", err)
		}
	})
	// The pod is wired with the agent's own building blocks; VLAN 1 (the other member's) first.
	pod := testutil.NewNetNS(t)
	mac, err := net.ParseMAC(tr.MacAddress)
	must(t, err)
	pod4 := netip.MustParseAddr(podIP)
	trunkENI := datapath.ENI{MAC: mac, PrimaryIP: netip.MustParseAddr(tr.PrivateIpAddress), Gateway: netip.MustParseAddr("192.168.1.253")}
	var el datapath.ENILink
	must(t, nsutil.Do(l.n1, func() error {
		if err := datapath.PrepareNode(); err != nil {
			return err
		}
		var err error
		_, el, err = tp.SetupPod(datapath.TrunkPod{Link: datapath.PodLink{HostIfName: "tp1", PodNS: pod, PodIP: pod4},
			Trunk: trunkENI, VLAN: 1}, 5*time.Second)
		return err
	}))
	idx := el.Index
	if l1, ok := linkByMAC(l.h1, tr.MacAddress); !ok || l1.Attrs().Index != idx {
		t.Fatalf("SetupPod configured ifindex %d, want the trunk's link", idx)
	}
	// Attaching again (the next pod) must not put a second pair of programs on the link: a
	// doubly tagged frame would fail the VPC's check, so the successful dial below shows it.
	must(t, nsutil.Do(l.n1, func() error { return tp.Attach(idx) }))

	serveEcho(t, l.n2, "192.168.1.11:7100")
	// Another member's VLAN: the VPC drops it.
	if err := dialEchoQuick(pod, podIP, "192.168.1.11:7100"); err == nil {
		t.Fatal("a member pod reached node 2 with another member's VLAN")
	}
	// No tag: the VPC takes the member's address on the trunk's link for a spoof.
	must(t, tp.DelPod(pod4, idx, 1))
	if err := dialEchoQuick(pod, podIP, "192.168.1.11:7100"); err == nil {
		t.Fatal("an untagged member pod reached node 2: the VPC's per-VLAN source check is missing")
	}

	must(t, tp.AddPod(pod4, idx, vlan))
	must(t, dialEcho(pod, podIP, "192.168.1.11:7100"))
	st, err := tp.Stats()
	must(t, err)
	if st.Tagged == 0 || st.Untagged == 0 {
		t.Fatalf("trunk stats %+v: want tagged and untagged packets", st)
	}
	if st.DropUnknownVLAN+st.DropWrongDst+st.DropPush != 0 {
		t.Fatalf("trunk stats %+v: the node dropped tagged frames", st)
	}

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
	must(t, nsutil.Do(l.n1, func() error { return tp.TeardownPod("tp1", pod4, idx, vlan) }))
	if _, err := l.h1.LinkByName("tp1"); err == nil {
		t.Fatal("the pod's host veth survived TeardownPod")
	}
	must(t, detach(l.c, inst, tr.NetworkInterfaceId))
	waitStatus(t, l.c, tr.NetworkInterfaceId, StatusAvailable)
	if _, err := l.vpcH.LinkByName(VPCLinkName(tr.NetworkInterfaceId)); err == nil {
		t.Fatal("the VPC still has the detached trunk's veth")
	}
}
