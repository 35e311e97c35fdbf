//go:build linux

package ecsemu

import (
	"net"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap/zaptest"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
)

// TestReplugInstanceIntoANewGuest destroys an instance's guest namespace (its VM died: the
// kernel deletes every ENI's veth pair, and with the VPC-side ends their routes), gives the
// SDN a fresh namespace and replugs: the primary ENI is eth0 again with its address and
// default route, the secondary ENI is back with its MAC, left down, and the VPC routes its
// assigned address to it again — the cloud kept the ENI attached and its addresses assigned.
func TestReplugInstanceIntoANewGuest(t *testing.T) {
	testutil.RequirePrivileged(t)
	vpc := testutil.NewNetNS(t)
	old, err := nsutil.NewAnon()
	must(t, err)
	defer func() {
		if old.IsOpen() {
			old.Close()
		}
	}()
	cfg := TestConfig()
	cfg.Delays = TransitionDelays{Attach: Duration(20 * time.Millisecond), Detach: Duration(20 * time.Millisecond)}
	sdn, err := NewNetnsSDN(vpc, map[string]netns.NsHandle{"i-test-0001": old}, zaptest.NewLogger(t))
	must(t, err)
	t.Cleanup(func() {
		if err := sdn.Close(); err != nil {
			t.Errorf("close SDN: %v", err)
		}
	})
	e, addr := NewTestServer(t, cfg, WithSDN(sdn), WithLogger(zaptest.NewLogger(t)))
	c, _ := NewTestClients(t, addr)
	vpcH, err := netlink.NewHandleAt(vpc)
	must(t, err)
	defer vpcH.Close()

	eni := createENI(t, c, "vsw-test-b", nil)
	must(t, attach(t, c, "i-test-0001", eni.NetworkInterfaceId))
	waitStatus(t, c, eni.NetworkInterfaceId, StatusInUse)
	resp, err := assignN(c, eni.NetworkInterfaceId, 2, "")
	must(t, err)
	assigned := resp.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress
	primary := e.Snapshot().Instances[0].PrimaryENI

	// The VM dies: its namespace goes, and the kernel takes every veth pair with it.
	old.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err1 := vpcH.LinkByName(VPCLinkName(primary))
		_, err2 := vpcH.LinkByName(VPCLinkName(eni.NetworkInterfaceId))
		if err1 != nil && err2 != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the VPC-side veths of the dead guest are still there after 30s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if s, _ := e.Snapshot().ENI(eni.NetworkInterfaceId); s.Status != StatusInUse || s.InstanceID != "i-test-0001" || len(s.IPs) != 3 {
		t.Fatalf("the cloud let go of the ENI when its guest died: %+v", s)
	}

	fresh := testutil.NewNetNS(t)
	sdn.SetInstanceNS("i-test-0001", fresh)
	plugged, err := e.ReplugInstance("i-test-0001")
	must(t, err)
	if len(plugged) != 2 || plugged[0] != primary || plugged[1] != eni.NetworkInterfaceId {
		t.Fatalf("replugged %v, want the primary %s then %s", plugged, primary, eni.NetworkInterfaceId)
	}
	h, err := netlink.NewHandleAt(fresh)
	must(t, err)
	defer h.Close()
	eth0, err := h.LinkByName("eth0")
	must(t, err)
	addrs, err := h.AddrList(eth0, netlink.FAMILY_V4)
	must(t, err)
	if eth0.Attrs().OperState != netlink.OperUp || len(addrs) != 1 || addrs[0].IPNet.String() != "192.168.1.10/24" {
		t.Fatalf("the new guest's eth0 is %s with %v, want up with 192.168.1.10/24", eth0.Attrs().OperState, addrs)
	}
	routes, err := h.RouteList(eth0, netlink.FAMILY_V4)
	must(t, err)
	def := false
	for _, r := range routes {
		def = def || (r.Dst == nil || r.Dst.String() == "0.0.0.0/0") && r.Gw.Equal(net.ParseIP("192.168.1.253"))
	}
	if !def {
		t.Fatalf("the new guest has no default route via the vSwitch gateway: %v", routes)
	}
	link, ok := linkByMAC(h, eni.MacAddress)
	if !ok || link.Attrs().Name != "eth1" || link.Attrs().Flags&net.FlagUp != 0 {
		t.Fatalf("the secondary ENI in the new guest: found %v, %v; want eth1 with MAC %s, down", ok, link, eni.MacAddress)
	}
	r := vpcRoutes(t, vpcH, eni.NetworkInterfaceId)
	for _, ip := range append([]string{eni.PrivateIpAddress}, assigned...) {
		if !r[ip] {
			t.Fatalf("the VPC does not route %s to the replugged ENI (routes %v)", ip, r)
		}
	}
	// Replugging a live guest again is harmless: the old plug is removed first.
	if _, err := e.ReplugInstance("i-test-0001"); err != nil {
		t.Fatalf("replug a live guest: %v", err)
	}
	if _, ok := linkByMAC(h, eni.MacAddress); !ok {
		t.Fatalf("the secondary ENI is gone after a second replug")
	}
}
