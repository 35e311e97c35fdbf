package datapath

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
)

// TestExclusiveENIMovesIntoThePodAndBack: an "ENI" (a veth with the ENI's MAC, whose peer
// stays in the node namespace playing the VPC) moves into the pod as eth0 with the primary
// address, the vSwitch prefix and a default route via the gateway; veth1 beside it carries
// the Service CIDR and the node address; a retried setup is accepted; ReturnExclusiveENI puts
// the link back in the node under a name of its own, without address.
func TestExclusiveENIMovesIntoThePodAndBack(t *testing.T) {
	testutil.RequirePrivileged(t)
	node := testutil.NewNetNS(t)
	pod := testutil.NewNetNS(t)
	mac, _ := net.ParseMAC("02:00:5e:00:53:42")
	ip := netip.MustParseAddr("192.168.2.20")
	x := ExclusiveENI{MAC: mac, IP: ip, Prefix: netip.MustParsePrefix("192.168.2.0/24"), Gateway: netip.MustParseAddr("192.168.2.253"),
		PodNS: pod, PodIfName: "eth0", HostIfName: "ternexcl0", LinkTimeout: time.Second,
		ViaVeth: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16"), netip.MustParsePrefix("192.168.0.10/32")}}
	err := nsutil.Do(node, func() error {
		la := netlink.NewLinkAttrs()
		la.Name = "eth1"
		la.HardwareAddr = mac
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "vpc1"}); err != nil {
			return err
		}
		peer, err := netlink.LinkByName("vpc1")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(peer); err != nil {
			return err
		}
		if _, err := SetupExclusiveENI(x); err != nil {
			return err
		}
		// A retried ADD finds the ENI in the pod already.
		if err := DeletePodLink(x.HostIfName); err != nil {
			return err
		}
		if _, err := SetupExclusiveENI(x); err != nil {
			return err
		}
		if l, _ := linkWithMAC(mac); l != nil {
			t.Errorf("the ENI link %s is still in the node", l.Attrs().Name)
		}
		rules, err := PodRulesOf(ip)
		if err != nil || !rules.ToMain || rules.FromTable != 0 {
			t.Errorf("node rules of %s: %+v %v, want to-main only", ip, rules, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	err = nsutil.Do(pod, func() error {
		eth0, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if eth0.Attrs().HardwareAddr.String() != mac.String() || eth0.Attrs().OperState != netlink.OperUp {
			t.Errorf("pod eth0: MAC %s state %s", eth0.Attrs().HardwareAddr, eth0.Attrs().OperState)
		}
		addrs, _ := netlink.AddrList(eth0, netlink.FAMILY_V4)
		if len(addrs) != 1 || addrs[0].IPNet.String() != "192.168.2.20/24" {
			t.Errorf("pod eth0 addresses %v, want 192.168.2.20/24", addrs)
		}
		veth, err := netlink.LinkByName(ExclusiveVethName)
		if err != nil {
			return err
		}
		if a, _ := netlink.AddrList(veth, netlink.FAMILY_V4); len(a) != 0 {
			t.Errorf("veth1 has addresses %v, want none", a)
		}
		neighs, _ := netlink.NeighList(veth.Attrs().Index, netlink.FAMILY_V4)
		found := false
		for _, n := range neighs {
			if n.IP.Equal(PodGateway.AsSlice()) && n.State == netlink.NUD_PERMANENT {
				found = true
			}
		}
		if !found {
			t.Errorf("veth1 lacks the permanent neighbour %s: %v", PodGateway, neighs)
		}
		for dst, want := range map[string]int{"8.8.8.8": eth0.Attrs().Index, "192.168.2.99": eth0.Attrs().Index,
			"10.96.0.1": veth.Attrs().Index, "192.168.0.10": veth.Attrs().Index} {
			rs, err := netlink.RouteGet(net.ParseIP(dst))
			if err != nil || len(rs) == 0 || rs[0].LinkIndex != want || !rs[0].Src.Equal(ip.AsSlice()) {
				t.Errorf("route to %s: %+v %v, want link %d source %s", dst, rs, err, want, ip)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := ReturnExclusiveENI(pod, mac, node); err != nil {
		t.Fatal(err)
	}
	err = nsutil.Do(node, func() error {
		l, err := linkWithMAC(mac)
		if err != nil || l == nil {
			t.Fatalf("the ENI is not back in the node: %v", err)
		}
		if l.Attrs().Name == "eth0" {
			t.Errorf("the returned ENI took the name eth0")
		}
		if a, _ := netlink.AddrList(l, netlink.FAMILY_V4); len(a) != 0 {
			t.Errorf("the returned ENI keeps addresses %v", a)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
