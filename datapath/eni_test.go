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
