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

// TestEnsureENIAndPodRules builds an "ENI" (a veth whose peer plays the VPC) in a throwaway
// node namespace and checks the link, its table and the pod rules as the kernel reports them.
func TestEnsureENIAndPodRules(t *testing.T) {
	testutil.RequirePrivileged(t)
	node := testutil.NewNetNS(t)
	mac, _ := net.ParseMAC("02:00:5e:00:53:17")
	gw := netip.MustParseAddr("192.168.2.253")
	pod := netip.MustParseAddr("192.168.2.20")
	err := nsutil.Do(node, func() error {
		// A node has its own address on its primary interface (the ENI links carry none);
		// the kernel accepts an onlink gateway only in a namespace with some IPv4 address.
		pa := netlink.NewLinkAttrs()
		pa.Name = "eth0"
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: pa, PeerName: "vpc0"}); err != nil {
			return err
		}
		eth0, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(eth0); err != nil {
			return err
		}
		if err := netlink.AddrAdd(eth0, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(192, 168, 0, 10).To4(), Mask: net.CIDRMask(24, 32)}}); err != nil {
			return err
		}
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
		// An earlier version left the ENI's primary on the link; EnsureENI must take it off.
		eth1, err := netlink.LinkByName("eth1")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(eth1, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(192, 168, 2, 10).To4(), Mask: net.CIDRMask(32, 32)}}); err != nil {
			return err
		}
		e := ENI{MAC: mac, PrimaryIP: netip.MustParseAddr("192.168.2.10"), Gateway: gw}
		got, err := EnsureENI(e, time.Second)
		if err != nil {
			return err
		}
		again, err := EnsureENI(e, time.Second) // idempotent
		if err != nil {
			return err
		}
		if got.Name != "eth1" || got.Table != ENITableBase+got.Index || again != got {
			t.Errorf("EnsureENI = %+v then %+v, want eth1 with table 1000+ifindex twice", got, again)
		}
		l, _ := netlink.LinkByName("eth1")
		if l.Attrs().OperState != netlink.OperUp {
			t.Errorf("eth1 operstate %s, want up", l.Attrs().OperState)
		}
		// The ENI's primary address may be a pod's: the link must not hold it.
		if addrs, err := netlink.AddrList(l, netlink.FAMILY_V4); err != nil || len(addrs) != 0 {
			t.Errorf("eth1 addresses %v (%v), want none", addrs, err)
		}
		routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: got.Table}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return err
		}
		if len(routes) != 1 || !routes[0].Gw.Equal(gw.AsSlice()) || routes[0].LinkIndex != got.Index || routes[0].Flags&int(netlink.FLAG_ONLINK) == 0 {
			t.Errorf("table %d = %+v, want one default via %s onlink dev eth1", got.Table, routes, gw)
		}

		if err := SetupPodRules(pod, got.Table); err != nil {
			return err
		}
		if err := SetupPodRules(pod, got.Table+1); err != nil { // a new owner replaces the old rules
			return err
		}
		r, err := PodRulesOf(pod)
		if err != nil {
			return err
		}
		if !r.ToMain || r.FromTable != got.Table+1 {
			t.Errorf("rules of %s = %+v, want to→main and from→%d", pod, r, got.Table+1)
		}
		n := 0
		rules, _ := netlink.RuleList(netlink.FAMILY_V4)
		for _, rl := range rules {
			if rl.Priority == FromPodRulePriority || rl.Priority == ToPodRulePriority {
				n++
			}
		}
		if n != 2 {
			t.Errorf("%d pod rules in the namespace, want exactly 2: %v", n, rules)
		}
		if err := DeletePodRules(pod); err != nil {
			return err
		}
		if err := DeletePodRules(pod); err != nil {
			return err
		}
		if r, _ := PodRulesOf(pod); r.ToMain || r.FromTable != 0 {
			t.Errorf("rules left after delete: %+v", r)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
