package e2e

// Service features on the socket path next to the tc path, with real sockets: client
// processes in a cgroup this test creates (the socket hooks' "in") and outside it ("out",
// served by the tc programs on the pod's veth), in a pod namespace and in the node namespace
// (a host-network process), all namespaces this test's. Each subtest is a row of the
// inventory in docs/socket-lb.md ("Service features: socket path and tc path").

import (
	"fmt"
	"net/netip"
	"syscall"
	"testing"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/internal/sockclient"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/lbmap"
)

var (
	featAffinityVIP = netip.MustParseAddr("10.96.0.20")
	featMaglevVIP   = netip.MustParseAddr("10.96.0.21")
	featDropVIP     = netip.MustParseAddr("10.96.0.22")
	featHairpinVIP  = netip.MustParseAddr("10.96.0.23") // b1 alone
	// LoadBalancer IPs with loadBalancerSourceRanges: one lets only the node in, one only
	// the client pod.
	featLBNodeOnly = netip.MustParseAddr("203.0.113.14")
	featLBPodOnly  = netip.MustParseAddr("203.0.113.15")
)

const (
	featNodeAddr = "10.0.0.2" // newNodeLab's node address (on its lo)
	featClientIP = "10.0.1.10"
)

func TestSocketLBServiceFeatures(t *testing.T) {
	lab := newNodeLab(t)
	client := lab.addPod("client", featClientIP)
	b1 := lab.addPod("b1", "10.0.1.21")
	b2 := lab.addPod("b2", "10.0.1.22")
	b1.serveSeen(t, 8080)
	b2.serveSeen(t, 8080)

	d := loadertest.New(t, loader.Config{})
	lab.attachAll(d)
	var cookie uint64
	if err := nsutil.Do(lab.node, func() (err error) { cookie, err = loader.CurrentNetnsCookie(); return err }); err != nil {
		t.Fatal(err)
	}
	sock, err := d.LoadSockFor(loader.SockHost{NetnsCookie: cookie, Addr: netip.MustParseAddr(featNodeAddr)})
	if err != nil {
		t.Fatalf("load the sock object: %v", err)
	}
	defer sock.Close()
	in, out := newTestCgroups(t)
	if err := sock.Attach(in); err != nil {
		t.Fatal(err)
	}

	both := []service.Backend{{Addr: b1.ip, Port: 8080}, {Addr: b2.ip, Port: 8080}}
	tcp := func(a netip.Addr) service.Frontend { return service.Frontend{Addr: a, Port: 80, Proto: service.TCP} }
	udp := func(a netip.Addr) service.Frontend { return service.Frontend{Addr: a, Port: 53, Proto: service.UDP} }
	opts := map[service.Frontend]service.Options{
		tcp(featAffinityVIP): {AffinitySeconds: 600},
		tcp(featMaglevVIP):   {MaglevSize: service.MaglevSize(len(both), 0)},
		tcp(featDropVIP):     {DropWhenEmpty: true},
		tcp(featLBNodeOnly):  {Kind: service.KindLoadBalancer, SourceRanges: featNodeAddr + "/32"},
		udp(featLBNodeOnly):  {Kind: service.KindLoadBalancer, SourceRanges: featNodeAddr + "/32"},
		tcp(featLBPodOnly):   {Kind: service.KindLoadBalancer, SourceRanges: featClientIP + "/32"},
		udp(featLBPodOnly):   {Kind: service.KindLoadBalancer, SourceRanges: featClientIP + "/32"},
	}
	desired := service.State{
		tcp(vip): both, tcp(emptyVIP): {}, udp(emptyVIP): {},
		tcp(featAffinityVIP): both, tcp(featMaglevVIP): both, tcp(featDropVIP): {},
		tcp(featLBNodeOnly): both, udp(featLBNodeOnly): both, tcp(featLBPodOnly): both, udp(featLBPodOnly): both,
		tcp(featHairpinVIP): both[:1],
	}
	var dirty []service.Frontend
	for f := range desired {
		dirty = append(dirty, f)
	}
	r, err := lbmap.NewReconciler(d.Maps(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.ApplyWith(desired.Lookup, func(f service.Frontend) service.Options { return opts[f] }, dirty); err != nil {
		t.Fatal(err)
	}
	for f, o := range opts {
		if o.SourceRanges == "" {
			continue
		}
		if err := requireSrcRangeFlag(d.Maps(), f); err != nil {
			t.Fatal(err)
		}
	}
	m := d.Maps()
	podIn := sockclient.Start(t, client.ns, in)
	podOut := sockclient.Start(t, client.ns, out)
	hostIn := sockclient.Start(t, lab.node, in)

	// measure runs cmd on c and returns its answer with the counters' movement.
	type moved func(loader.Reason, loader.Direction) uint64
	measure := func(c *sockclient.Client, cmd string) (sockclient.Answer, moved) {
		t.Helper()
		before := counters(t, m)
		a := c.Do(cmd)
		after := counters(t, m)
		return a, func(r loader.Reason, dir loader.Direction) uint64 { return delta(after, before, r, dir) }
	}
	answeredBy := func(t *testing.T, what string, a sockclient.Answer, peer string) {
		t.Helper()
		if a.Err != "" || (a.Who != "b1" && a.Who != "b2") || a.Peer != peer {
			t.Fatalf("%s: %+v, want an answer from b1 or b2 with peer %s", what, a, peer)
		}
	}

	t.Run("loadBalancerSourceRanges", func(t *testing.T) {
		nodeOnly := fmt.Sprintf("%s:80", featLBNodeOnly)
		podOnly := fmt.Sprintf("%s:80", featLBPodOnly)

		// Host-network process (socket path; the tc path never sees the node's own
		// sockets). Its unbound socket's source is the node's address (SockHost).
		a, mv := measure(hostIn, "tcpt "+nodeOnly+" 2000")
		answeredBy(t, "host -> LB allowing the node", a, nodeOnly)
		if mv(loader.ReasonSockConnect, loader.DirSock) != 1 {
			t.Fatal("the host's connect to an allowed LB IP was not translated by the socket hook")
		}
		a, mv = measure(hostIn, "tcpt "+podOnly+" 2000")
		if a.Errno != int(syscall.ETIMEDOUT) || mv(loader.ReasonDropSrcRange, loader.DirSock) != 1 {
			t.Fatalf("host -> LB allowing only the pod: %+v (drop_src_range/sock +%d), want ETIMEDOUT at once, counted",
				a, mv(loader.ReasonDropSrcRange, loader.DirSock))
		}
		a, mv = measure(hostIn, fmt.Sprintf("sendto %s:53", featLBPodOnly))
		if a.Errno != int(syscall.ETIMEDOUT) || mv(loader.ReasonDropSrcRange, loader.DirSock) != 1 {
			t.Fatalf("host UDP -> LB allowing only the pod: %+v, want ETIMEDOUT, counted", a)
		}
		a, _ = measure(hostIn, fmt.Sprintf("sendto %s:53", featLBNodeOnly))
		answeredBy(t, "host UDP -> LB allowing the node", a, fmt.Sprintf("%s:53", featLBNodeOnly))

		// A host socket bound to another address: that address is the client.
		a, mv = measure(hostIn, fmt.Sprintf("tcpfrom 127.0.0.1:0 %s 2000", nodeOnly))
		if a.Errno != int(syscall.ETIMEDOUT) || mv(loader.ReasonDropSrcRange, loader.DirSock) != 1 {
			t.Fatalf("host socket bound to 127.0.0.1 -> LB allowing %s: %+v, want dropped", featNodeAddr, a)
		}

		// A pod's unbound socket in the cgroup: its address is not known at connect(), so
		// the hook leaves it to the tc path, which checks the first packet's source.
		a, mv = measure(podIn, "tcpt "+podOnly+" 2000")
		answeredBy(t, "pod (in) -> LB allowing the pod", a, podOnly)
		if mv(loader.ReasonSockDefer, loader.DirSock) != 1 || mv(loader.ReasonSvcForward, loader.DirFromPod) == 0 {
			t.Fatal("the pod's unbound connect was not deferred to the tc path")
		}
		a, mv = measure(podIn, "tcpt "+nodeOnly+" 500")
		if a.Err == "" || mv(loader.ReasonSockDefer, loader.DirSock) != 1 || mv(loader.ReasonDropSrcRange, loader.DirFromPod) == 0 {
			t.Fatalf("pod (in) -> LB allowing only the node: %+v, want no answer, dropped by from-pod", a)
		}
		// Bound to its address, the pod is checked at the socket: no packet is sent.
		a, mv = measure(podIn, fmt.Sprintf("tcpfrom %s:0 %s 2000", featClientIP, nodeOnly))
		if a.Errno != int(syscall.ETIMEDOUT) || mv(loader.ReasonDropSrcRange, loader.DirSock) != 1 || mv(loader.ReasonDropSrcRange, loader.DirFromPod) != 0 {
			t.Fatalf("bound pod socket -> LB allowing only the node: %+v, want ETIMEDOUT from the hook", a)
		}
		a, mv = measure(podIn, fmt.Sprintf("tcpfrom %s:0 %s 2000", featClientIP, podOnly))
		answeredBy(t, "bound pod socket -> LB allowing the pod", a, podOnly)
		if mv(loader.ReasonSockConnect, loader.DirSock) != 1 || mv(loader.ReasonSvcForward, loader.DirFromPod) != 0 {
			t.Fatal("the bound pod socket to an allowed LB IP was not translated at the socket")
		}
		// UDP from a pod: its unconnected socket is bound to 0.0.0.0:port, so deferred too.
		a, mv = measure(podIn, fmt.Sprintf("sendto %s:53", featLBPodOnly))
		answeredBy(t, "pod UDP (in) -> LB allowing the pod", a, fmt.Sprintf("%s:53", featLBPodOnly))
		if mv(loader.ReasonSockDefer, loader.DirSock) != 1 {
			t.Fatal("the pod's unconnected UDP datagram was not deferred")
		}
		// The tc path alone (outside the cgroup) gives the same outcomes.
		a, _ = measure(podOut, "tcpt "+podOnly+" 2000")
		answeredBy(t, "pod (out) -> LB allowing the pod", a, podOnly)
		a, mv = measure(podOut, "tcpt "+nodeOnly+" 500")
		if a.Err == "" || mv(loader.ReasonDropSrcRange, loader.DirFromPod) == 0 {
			t.Fatalf("pod (out) -> LB allowing only the node: %+v, want dropped by from-pod", a)
		}
	})

	t.Run("maglev", func(t *testing.T) {
		predict := maglevPredictor(t, m, featMaglevVIP)
		addr := fmt.Sprintf("%s:80", featMaglevVIP)
		// A socket bound to its address and port: the hook hashes the tuple the tc path
		// would; the backend is the table's, for the socket (in) and the tc path (out) alike.
		spread := map[string]int{}
		for i := range 16 {
			for _, c := range []struct {
				name string
				cl   *sockclient.Client
				port int
			}{{"in", podIn, 41000 + i}, {"out", podOut, 42000 + i}} {
				a, mv := measure(c.cl, fmt.Sprintf("tcpfrom %s:%d %s 2000", featClientIP, c.port, addr))
				answeredBy(t, "maglev "+c.name, a, addr)
				want := predict(netip.MustParseAddr(featClientIP), uint16(c.port))
				if got := map[string]netip.Addr{"b1": b1.ip, "b2": b2.ip}[a.Who]; got != want {
					t.Fatalf("%s: source port %d went to %s, the Maglev table names %s", c.name, c.port, got, want)
				}
				if c.name == "in" && mv(loader.ReasonSockMaglev, loader.DirSock) != 1 {
					t.Fatal("the bound socket's backend was not chosen by the Maglev table at the socket")
				}
				spread[a.Who]++
			}
		}
		if spread["b1"] == 0 || spread["b2"] == 0 {
			t.Fatalf("32 tuples all went to one backend: %v", spread)
		}
		// Host socket bound to a port only: its address is the node's.
		for i := range 8 {
			port := 43000 + i
			a, mv := measure(hostIn, fmt.Sprintf("tcpfrom 0.0.0.0:%d %s 2000", port, addr))
			answeredBy(t, "maglev host", a, addr)
			want := predict(netip.MustParseAddr(featNodeAddr), uint16(port))
			if got := map[string]netip.Addr{"b1": b1.ip, "b2": b2.ip}[a.Who]; got != want || mv(loader.ReasonSockMaglev, loader.DirSock) != 1 {
				t.Fatalf("host port %d went to %s, the table names %s", port, got, want)
			}
		}
		// An unbound socket's port is chosen after the hook: random, not counted.
		a, mv := measure(podIn, "tcp "+addr)
		answeredBy(t, "maglev unbound", a, addr)
		if mv(loader.ReasonSockMaglev, loader.DirSock) != 0 || mv(loader.ReasonSockConnect, loader.DirSock) != 1 {
			t.Fatal("an unbound socket was counted as a Maglev choice")
		}
	})

	t.Run("sessionAffinity", func(t *testing.T) {
		addr := fmt.Sprintf("%s:80", featAffinityVIP)
		for _, c := range []struct {
			name string
			cl   *sockclient.Client
		}{{"pod in", podIn}, {"pod out", podOut}, {"host in", hostIn}} {
			first := ""
			for range 8 {
				a, _ := measure(c.cl, "tcp "+addr)
				answeredBy(t, c.name, a, addr)
				if first == "" {
					first = a.Who
				} else if a.Who != first {
					t.Fatalf("%s: affinity broke, %s then %s", c.name, first, a.Who)
				}
			}
		}
	})

	t.Run("no endpoints", func(t *testing.T) {
		for _, c := range []struct {
			name string
			cl   *sockclient.Client
		}{{"pod in", podIn}, {"pod out", podOut}, {"host in", hostIn}} {
			a := c.cl.Do(fmt.Sprintf("tcp %s:80", emptyVIP))
			if a.Errno != int(syscall.ECONNREFUSED) {
				t.Fatalf("%s TCP to a Service without endpoints: %+v, want ECONNREFUSED", c.name, a)
			}
			// Connected UDP: refused at connect() by the hook, or (tc path) the first
			// datagram's ICMP port unreachable reported on the socket.
			u := c.cl.Do(fmt.Sprintf("udpconn %s:53", emptyVIP))
			if u.Errno != int(syscall.ECONNREFUSED) {
				t.Fatalf("%s connected UDP to a Service without endpoints: %+v, want ECONNREFUSED", c.name, u)
			}
		}
		// An unconnected socket's sendto() is refused by the sendmsg hook (the tc path's
		// ICMP error is not reported on an unconnected socket).
		for _, c := range []*sockclient.Client{podIn, hostIn} {
			if u := c.Do(fmt.Sprintf("sendto %s:53", emptyVIP)); u.Errno != int(syscall.ECONNREFUSED) {
				t.Fatalf("sendto a Service without endpoints: %+v, want ECONNREFUSED", u)
			}
		}
	})

	t.Run("hairpin", func(t *testing.T) {
		// b1 reaching the Service only it backs: through the tc path it is masqueraded to
		// the hairpin address; through the socket it connects to itself and sees itself.
		addr := fmt.Sprintf("%s:80", featHairpinVIP)
		selfIn := sockclient.Start(t, b1.ns, in)
		selfOut := sockclient.Start(t, b1.ns, out)
		a := selfIn.Do("tcp " + addr)
		if a.Who != "b1" || a.Peer != addr || hostOf(t, a.Seen) != b1.ip {
			t.Fatalf("hairpin through the socket: %+v, want b1 seeing itself (%s)", a, b1.ip)
		}
		a = selfOut.Do("tcp " + addr)
		if a.Who != "b1" || a.Peer != addr || hostOf(t, a.Seen) != netip.MustParseAddr("169.254.42.1") {
			t.Fatalf("hairpin through the tc path: %+v, want b1 seeing the hairpin address", a)
		}
	})

	t.Run("internalTrafficPolicy Local, no local endpoint", func(t *testing.T) {
		addr := fmt.Sprintf("%s:80", featDropVIP)
		for _, c := range []struct {
			name string
			cl   *sockclient.Client
			hook bool
		}{{"pod in", podIn, true}, {"host in", hostIn, true}, {"pod out", podOut, false}} {
			a, mv := measure(c.cl, "tcpt "+addr+" 500")
			if a.Err == "" {
				t.Fatalf("%s: answered %+v, want dropped", c.name, a)
			}
			if c.hook && (a.Errno != int(syscall.ETIMEDOUT) || mv(loader.ReasonDropNoLocalBackend, loader.DirSock) != 1) {
				t.Fatalf("%s: %+v, want ETIMEDOUT from the hook", c.name, a)
			}
			if !c.hook && mv(loader.ReasonDropNoLocalBackend, loader.DirFromPod) == 0 {
				t.Fatalf("%s: not dropped by from-pod", c.name)
			}
		}
	})
}

// requireSrcRangeFlag checks the test's premise: the reconciler flagged f as a frontend
// with source ranges.
func requireSrcRangeFlag(m *loader.Maps, f service.Frontend) error {
	svcs, err := m.DumpServices()
	if err != nil {
		return err
	}
	proto := uint8(packet.ProtoTCP)
	if f.Proto == service.UDP {
		proto = packet.ProtoUDP
	}
	sv, ok := svcs[loader.ServiceKey{Addr: loader.AddrToBE(f.Addr), Port: loader.PortToBE(f.Port), Proto: proto}]
	if !ok || sv.Flags&loader.SvcFlagSrcRanges == 0 {
		return fmt.Errorf("frontend %s: %+v, want the source-range flag", f, sv)
	}
	return nil
}

// maglevPredictor reads the Maglev frontend vip:80/TCP's table back from the kernel and
// says which backend it gives a client's tuple (loader.LBTupleHash, the datapath's hash).
func maglevPredictor(t *testing.T, m *loader.Maps, vip netip.Addr) func(src netip.Addr, sport uint16) netip.Addr {
	t.Helper()
	svcs, err := m.DumpServices()
	if err != nil {
		t.Fatal(err)
	}
	sv := svcs[loader.ServiceKey{Addr: loader.AddrToBE(vip), Port: loader.PortToBE(80), Proto: packet.ProtoTCP}]
	if sv.Flags&loader.SvcFlagMaglev == 0 {
		t.Fatalf("frontend flags %#x lack Maglev", sv.Flags)
	}
	var o loader.SvcOpts
	if err := m.Opts.Lookup(sv.Id, &o); err != nil {
		t.Fatal(err)
	}
	blocks, err := m.DumpMaglev()
	if err != nil {
		t.Fatal(err)
	}
	slots, err := m.DumpBackends()
	if err != nil {
		t.Fatal(err)
	}
	return func(src netip.Addr, sport uint16) netip.Addr {
		idx := loader.LBTupleHash(src, vip, sport, 80, packet.ProtoTCP) % o.MaglevSize
		slot := blocks[loader.MaglevKey{SvcId: sv.Id, Block: idx / loader.MaglevBlock}].Slot[idx%loader.MaglevBlock]
		b, ok := slots[loader.BackendKey{SvcId: sv.Id, Slot: uint32(slot)}]
		if !ok {
			t.Fatalf("table entry %d names slot %d, which is empty", idx, slot)
		}
		return loader.BEToAddr(b.Addr)
	}
}
