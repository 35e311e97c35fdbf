package e2e

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/tern-net/tern/datapath"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// The masquerade lab, every part in a namespace of its own:
//
//	pods ── veth ── node ── eth0 (10.0.0.10, primary NIC) ───── vpc0 ┐
//	                    └── eni1 (no address, pods' egress) ─── vpc1 ┤ vpc (10.0.0.1, router)
//	                                                            wan0 ┘── inet0 internet (203.0.113.10)
//
// Pods leave through their ENI (the product's policy routing: from podIP -> ENI table ->
// default via the gateway on eni1). The VPC namespace checks sources strictly on vpc1, as
// the VPC only accepts an ENI's own addresses from it: a masqueraded packet must leave
// through the primary NIC. The internet host has a route to nothing in the VPC but the
// router: it answers whatever source it sees.
const (
	masqNodeAddr = "10.0.0.10"
	masqGateway  = "10.0.0.1"
	internetAddr = "203.0.113.10"
)

type masqLab struct {
	*nodeLab
	vpc, inet  netns.NsHandle
	eth0, eni1 int // ifindexes in the node namespace
	eni1MAC    net.HardwareAddr
}

func newMasqLab(t *testing.T) *masqLab {
	l := &masqLab{nodeLab: newNodeLab(t), vpc: testutil.NewNetNS(t), inet: testutil.NewNetNS(t)}
	var vpc1MAC, eni1MAC net.HardwareAddr
	// veth pairs from the node and the internet host into the VPC namespace.
	mk := func(in netns.NsHandle, name, peer string) error {
		return nsutil.Do(in, func() error {
			la := netlink.NewLinkAttrs()
			la.Name = name
			return netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: peer, PeerNamespace: netlink.NsFd(int(l.vpc))})
		})
	}
	for _, p := range [][3]any{{l.node, "eth0", "vpc0"}, {l.node, "eni1", "vpc1"}, {l.inet, "inet0", "wan0"}} {
		if err := mk(p[0].(netns.NsHandle), p[1].(string), p[2].(string)); err != nil {
			t.Fatal(err)
		}
	}
	addr := func(link, cidr string) error {
		lk, err := netlink.LinkByName(link)
		if err != nil {
			return err
		}
		a, err := netlink.ParseAddr(cidr)
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(lk, a); err != nil {
			return fmt.Errorf("address %s on %s: %w", cidr, link, err)
		}
		if err := netlink.LinkSetUp(lk); err != nil {
			return err
		}
		return nil
	}
	up := func(names ...string) error {
		for _, n := range names {
			lk, err := netlink.LinkByName(n)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(lk); err != nil {
				return err
			}
		}
		for _, n := range names {
			if err := datapath.WaitOperUp(n, 5*time.Second); err != nil {
				return err
			}
		}
		return nil
	}
	err := nsutil.Do(l.vpc, func() error {
		for k, v := range map[string]string{"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "0"} {
			if err := datapath.SetSysctl(k, v); err != nil {
				return err
			}
		}
		if err := addr("vpc0", masqGateway+"/24"); err != nil {
			return err
		}
		if err := addr("wan0", "203.0.113.1/24"); err != nil {
			return err
		}
		lo, _ := netlink.LinkByName("lo")
		if err := netlink.LinkSetUp(lo); err != nil {
			return err
		}
		// Up; it comes to operstate up with its peer, eni1 (EnsureENI waits for that).
		if v1, err := netlink.LinkByName("vpc1"); err != nil || netlink.LinkSetUp(v1) != nil {
			return fmt.Errorf("bring vpc1 up: %v", err)
		}
		// Strict source check on the ENI side: only the pods behind it may send from it.
		if err := datapath.SetSysctl("net.ipv4.conf.vpc1.rp_filter", "1"); err != nil {
			return err
		}
		v1, err := netlink.LinkByName("vpc1")
		if err != nil {
			return err
		}
		vpc1MAC = v1.Attrs().HardwareAddr
		_, pods, _ := net.ParseCIDR("10.0.1.0/24")
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: v1.Attrs().Index, Dst: pods, Scope: netlink.SCOPE_LINK}); err != nil {
			return fmt.Errorf("route to the pods via the ENI: %w", err)
		}
		// Their peers come up later; waiting on the peers covers both ends.
		for _, n := range []string{"vpc0", "wan0"} {
			lk, err := netlink.LinkByName(n)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(lk); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	err = nsutil.Do(l.inet, func() error {
		if err := addr("inet0", internetAddr+"/24"); err != nil {
			return err
		}
		if err := up("inet0"); err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{Gw: net.ParseIP("203.0.113.1")})
	})
	if err != nil {
		t.Fatal(err)
	}
	err = nsutil.Do(l.node, func() error {
		if err := addr("eth0", masqNodeAddr+"/24"); err != nil {
			return err
		}
		if err := up("eth0"); err != nil {
			return err
		}
		e0, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		l.eth0 = e0.Attrs().Index
		if err := netlink.RouteAdd(&netlink.Route{Gw: net.ParseIP(masqGateway), LinkIndex: l.eth0}); err != nil {
			return fmt.Errorf("node default route: %w", err)
		}
		e1, err := netlink.LinkByName("eni1")
		if err != nil {
			return err
		}
		eni1MAC = e1.Attrs().HardwareAddr
		en, err := datapath.EnsureENI(datapath.ENI{MAC: eni1MAC, Gateway: netip.MustParseAddr(masqGateway)}, 5*time.Second)
		if err != nil {
			return err
		}
		l.eni1 = en.Index
		// The VPC's gateway answers ARP on an ENI in the cloud; the strict source check
		// here would drop an ARP from the node's address, so the neighbours are static.
		return netlink.NeighSet(&netlink.Neigh{LinkIndex: l.eni1, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
			IP: net.ParseIP(masqGateway), HardwareAddr: vpc1MAC})
	})
	if err != nil {
		t.Fatal(err)
	}
	l.eni1MAC = eni1MAC
	return l
}

// addENIPod adds a pod whose egress goes through eni1, as the CNI sets it up.
func (l *masqLab) addENIPod(t *testing.T, name, ip string) *podNS {
	p := l.addPod(name, ip)
	err := nsutil.Do(l.node, func() error {
		return datapath.SetupPodRules(p.ip, datapath.ENITable(l.eni1))
	})
	if err == nil {
		err = nsutil.Do(l.vpc, func() error {
			v1, err := netlink.LinkByName("vpc1")
			if err != nil {
				return err
			}
			return netlink.NeighSet(&netlink.Neigh{LinkIndex: v1.Attrs().Index, Family: netlink.FAMILY_V4,
				State: netlink.NUD_PERMANENT, IP: p.ip.AsSlice(), HardwareAddr: l.eni1MAC})
		})
	}
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// serveWho starts, in ns, a TCP server that greets each connection with the peer address
// it sees and then echoes lines, and a UDP server that answers with the peer address.
func serveWho(t *testing.T, ns netns.NsHandle, addr string) {
	t.Helper()
	serveTCPUDP(t, ns, addr, true, func(client net.Addr) string {
		ap, err := netip.ParseAddrPort(client.String())
		if err != nil {
			return client.String()
		}
		return ap.Addr().String()
	})
}

// loadMasq loads the datapath with cfg and masquerade to the node's address, marks the lab's
// pods local and attaches it to them and to the node's links.
func loadMasq(t *testing.T, l *masqLab, cfg loader.Config) *loader.Datapath {
	t.Helper()
	cfg.MasqAddr, cfg.MasqIfindex = netip.MustParseAddr(masqNodeAddr), l.eth0
	d := loadertest.New(t, cfg)
	m := d.Maps()
	if err := m.SetNonMasquerade([]netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("169.254.0.0/16")}); err != nil {
		t.Fatal(err)
	}
	for _, p := range l.pods {
		if err := m.PutIPCache(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(p.ip)},
			loader.IPCacheValue{Flags: loader.IPCacheFlagLocal | loader.IPCacheFlagPod}); err != nil {
			t.Fatal(err)
		}
	}
	l.attachAll(d)
	err := nsutil.Do(l.node, func() error {
		for _, idx := range []int{l.eth0, l.eni1} {
			if _, err := d.AttachNetdev(idx); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestMasqueradeToTheInternet: a pod reaching the internet host is seen there with the
// node's address (TCP and UDP) and gets its replies; the same pod reaching a VPC address
// keeps its own; 1,000 concurrent TCP flows through masquerade all complete, each seen from
// the node's address, with one NAT entry each.
func TestMasqueradeToTheInternet(t *testing.T) {
	l := newMasqLab(t)
	pod := l.addENIPod(t, "client", "10.0.1.10")
	d := loadMasq(t, l, loader.Config{})
	m := d.Maps()
	serveWho(t, l.inet, ":8080")
	serveWho(t, l.vpc, masqGateway+":8080")

	for _, c := range []struct {
		what, dst, want string
	}{
		{"internet host", internetAddr + ":8080", masqNodeAddr},
		{"VPC address", masqGateway + ":8080", "10.0.1.10"},
	} {
		cn, who, err := pod.dialTCP(c.dst)
		if err != nil {
			t.Fatalf("TCP from the pod to the %s: %v", c.what, err)
		}
		if who != c.want {
			t.Fatalf("the %s saw the pod's TCP from %s, want %s", c.what, who, c.want)
		}
		if err := cn.echo("hello"); err != nil {
			t.Fatalf("TCP echo with the %s: %v", c.what, err)
		}
		cn.c.Close()
		ans, from, err := pod.udpAsk(c.dst)
		if err != nil || ans != c.want || from.String() != c.dst {
			t.Fatalf("UDP from the pod to the %s: saw %q, answer from %s, err %v; want %s seen and the answer from %s",
				c.what, ans, from, err, c.want, c.dst)
		}
	}
	if n := loadertest.Metric(t, m, loader.ReasonMasq, loader.DirToNetdev); n == 0 {
		t.Fatal("nothing counted under masq/to-netdev")
	}
	if n := loadertest.Metric(t, m, loader.ReasonMasqRestore, loader.DirFromNetdev); n == 0 {
		t.Fatal("nothing counted under masq_restore/from-netdev")
	}

	// 1,000 flows open at once, then each echoes, then all close. The sockets are opened
	// one after another on one thread in the pod's namespace (a thread per dial would be a
	// thousand namespace switches, which a slow emulated kernel cannot do within any sane
	// dial timeout); every flow's greeting is read only once all are open.
	const flows = 1000
	conns := make([]*conn, flows)
	err := nsutil.Do(pod.ns, func() error {
		d := net.Dialer{Timeout: 20 * time.Second}
		for i := range conns {
			c, err := d.Dial("tcp4", internetAddr+":8080")
			if err != nil {
				return fmt.Errorf("flow %d: %w", i, err)
			}
			conns[i] = &conn{c: c, r: bufio.NewReader(c)}
		}
		return nil
	})
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.c.Close()
			}
		}
	}()
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, flows)
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.c.SetDeadline(time.Now().Add(30 * time.Second))
			who, err := c.r.ReadString('\n')
			if err != nil {
				errs <- fmt.Errorf("flow %d greeting: %w", i, err)
			} else if strings.TrimSpace(who) != masqNodeAddr {
				errs <- fmt.Errorf("flow %d seen from %s, want %s", i, strings.TrimSpace(who), masqNodeAddr)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	snat, err := m.DumpSNAT()
	if err != nil {
		t.Fatal(err)
	}
	live := 0
	for k, v := range snat {
		if loader.BEToAddr(v.OrigAddr) == pod.ip && k.Proto == 6 {
			live++
		}
	}
	if live < flows {
		t.Fatalf("%d TCP NAT entries for the pod with %d flows open, want at least %d", live, flows, flows)
	}
	for i, c := range conns {
		if err := c.echo(fmt.Sprintf("flow-%d", i)); err != nil {
			t.Fatalf("flow %d echo: %v", i, err)
		}
	}
	if n := loadertest.Metric(t, m, loader.ReasonDropSNATNoPort, loader.DirToNetdev); n != 0 {
		t.Fatalf("drop_snat_no_port = %d", n)
	}
}

// TestMasqueradeLeavesPodToPodAlone: two pods on VPC addresses talk with their own
// addresses, on one node, with masquerade on.
func TestMasqueradeLeavesPodToPodAlone(t *testing.T) {
	l := newMasqLab(t)
	a := l.addENIPod(t, "a", "10.0.1.10")
	b := l.addENIPod(t, "b", "10.0.1.11")
	d := loadMasq(t, l, loader.Config{})
	var bl net.Listener
	err := nsutil.Do(b.ns, func() (err error) {
		bl, err = net.Listen("tcp4", ":9090")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer bl.Close()
	seen := make(chan string, 1)
	go func() {
		c, err := bl.Accept()
		if err != nil {
			seen <- err.Error()
			return
		}
		defer c.Close()
		seen <- c.RemoteAddr().(*net.TCPAddr).IP.String()
		fmt.Fprintln(c, "ok")
	}()
	var c net.Conn
	err = nsutil.Do(a.ns, func() (err error) {
		c, err = (&net.Dialer{Timeout: 3 * time.Second}).Dial("tcp4", "10.0.1.11:9090")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "ok" {
		t.Fatalf("pod to pod: %q, %v", line, err)
	}
	if who := <-seen; who != "10.0.1.10" {
		t.Fatalf("pod b saw pod a as %s, want 10.0.1.10", who)
	}
	if snat, err := d.Maps().DumpSNAT(); err != nil || len(snat) != 0 {
		t.Fatalf("NAT entries %v (err %v) after pod-to-pod traffic, want none", snat, err)
	}
}
