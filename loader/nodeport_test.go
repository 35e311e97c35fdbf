package loader_test

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/tern-net/tern/datapath"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// NodePort, LoadBalancer IP and externalIP packet tables (bpf/lib/nodeport.h) run on the
// netdev programs with BPF_PROG_TEST_RUN. The programs ask the FIB where a translated
// packet goes, so they run inside a namespace of the test's own with a node address and a
// default route (nothing is sent: a test run only reports the redirect).

var (
	lbIP     = netip.MustParseAddr("192.0.2.100")
	inet2    = netip.MustParseAddr("203.0.113.11")
	outsider = netip.MustParseAddr("198.51.100.7")
)

type npHarness struct {
	d  *loader.Datapath
	m  *loader.Maps
	ns netns.NsHandle
}

// fibNS is a namespace with eth0 (10.0.0.10/24, its peer in the same namespace) and a
// default route via 10.0.0.1, forwarding on.
func fibNS(t *testing.T) netns.NsHandle {
	t.Helper()
	ns := testutil.NewNetNS(t)
	err := nsutil.Do(ns, func() error {
		la := netlink.NewLinkAttrs()
		la.Name = "eth0"
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "peer0"}); err != nil {
			return err
		}
		for _, n := range []string{"eth0", "peer0", "lo"} {
			l, err := netlink.LinkByName(n)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		if err := datapath.WaitOperUp("eth0", 5e9); err != nil {
			return err
		}
		eth0, _ := netlink.LinkByName("eth0")
		a, _ := netlink.ParseAddr(nodeAddr.String() + "/24")
		if err := netlink.AddrAdd(eth0, a); err != nil {
			return err
		}
		if err := netlink.RouteAdd(&netlink.Route{Gw: net.ParseIP("10.0.0.1"), LinkIndex: eth0.Attrs().Index}); err != nil {
			return fmt.Errorf("default route: %w", err)
		}
		return datapath.SetSysctl("net.ipv4.ip_forward", "1")
	})
	if err != nil {
		t.Fatal(err)
	}
	return ns
}

func newNP(t *testing.T) *npHarness {
	t.Helper()
	d := loadertest.New(t, loader.Config{MasqAddr: nodeAddr, NodePortAddr: nodeAddr})
	h := &npHarness{d: d, m: d.Maps(), ns: fibNS(t)}
	if err := h.m.PutIPCache(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(client)},
		loader.IPCacheValue{Flags: loader.IPCacheFlagLocal | loader.IPCacheFlagPod}); err != nil {
		t.Fatal(err)
	}
	if err := h.m.SetNonMasquerade([]netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}); err != nil {
		t.Fatal(err)
	}
	return h
}

// frontend writes a frontend with flags (loader.SvcFlag*) and its backends.
func (h *npHarness) frontend(t *testing.T, id uint32, addr netip.Addr, port uint16, proto uint8, flags uint16, bes ...loadertest.Backend) {
	t.Helper()
	loadertest.PutService(t, h.m, id, addr.String(), port, proto, bes...)
	k := loader.ServiceKey{Addr: loader.AddrToBE(addr), Port: loader.PortToBE(port), Proto: proto}
	if err := h.m.Services.Put(k, loader.ServiceValue{Id: id, BackendCount: uint16(len(bes)), Flags: flags}); err != nil {
		t.Fatal(err)
	}
}

// run runs prog on frame inside the harness's namespace.
func (h *npHarness) run(t *testing.T, prog *ebpf.Program, frame []byte) (uint32, []byte) {
	t.Helper()
	var (
		ret  uint32
		out  = make([]byte, len(frame)+256)
		rerr error
	)
	err := nsutil.Do(h.ns, func() error {
		opts := &ebpf.RunOptions{Data: frame, DataOut: out}
		ret, rerr = prog.Run(opts)
		out = opts.DataOut
		return nil
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		t.Fatalf("test run: %v", err)
	}
	return ret, out
}

// TestNodePortNetdev: the table of the netdev path for external frontends.
func TestNodePortNetdev(t *testing.T) {
	h := newNP(t)
	ext := uint16(loader.SvcFlagExternal)
	h.frontend(t, 1, nodeAddr, 30080, packet.ProtoTCP, ext, loadertest.B(client.String(), 8080)) // local backend
	h.frontend(t, 2, nodeAddr, 30081, packet.ProtoTCP, ext, loadertest.B(be1.String(), 8080))    // remote backend
	h.frontend(t, 3, nodeAddr, 30082, packet.ProtoTCP, ext)                                      // no endpoints
	h.frontend(t, 4, nodeAddr, 30083, packet.ProtoTCP, ext|loader.SvcFlagDropEmpty)              // eTP Local, none here
	h.frontend(t, 5, lbIP, 80, packet.ProtoTCP, ext|loader.SvcFlagSrcRanges, loadertest.B(client.String(), 8080))
	h.frontend(t, 6, nodeAddr, 30084, packet.ProtoUDP, ext, loadertest.B(be1.String(), 5353))
	h.frontend(t, 7, vip, 80, packet.ProtoTCP, 0, loadertest.B(be1.String(), 8080)) // ClusterIP
	if err := h.m.PutSrcRange(loader.SrcRangeKeyOf(5, netip.MustParsePrefix("203.0.113.0/24"))); err != nil {
		t.Fatal(err)
	}

	type step struct {
		name        string
		egress      bool // tern_to_netdev, else tern_from_netdev
		frame       []byte
		wantVerdict uint32
		// Wanted addresses after the program; a zero wantSrc skips the check.
		wantSrc   netip.Addr
		wantSport uint16 // 0: any port but the client's (a collision moved it)
		wantDst   netip.Addr
		wantDport uint16
		reason    loader.Reason
	}
	steps := []step{
		{"local backend: syn DNAT only, client kept", false, tcp(inet, 40000, nodeAddr, 30080, packet.SYN).Build(),
			verdictOK, inet, 40000, client, 8080, loader.ReasonNodePortForward},
		{"local backend: syn-ack restored on the way out", true, tcp(client, 8080, inet, 40000, packet.SYN|packet.ACK).Build(),
			verdictRedirect, nodeAddr, 30080, inet, 40000, loader.ReasonNodePortRevNAT},
		{"local backend: established ack", false, tcp(inet, 40000, nodeAddr, 30080, packet.ACK).Build(),
			verdictOK, inet, 40000, client, 8080, loader.ReasonNodePortForward},
		{"remote backend: syn DNAT + SNAT to the node", false, tcp(inet, 20001, nodeAddr, 30081, packet.SYN).Build(),
			verdictRedirect, nodeAddr, 20001, be1, 8080, loader.ReasonNodePortSNAT},
		{"remote backend: syn-ack back to the client", false, tcp(be1, 8080, nodeAddr, 20001, packet.SYN|packet.ACK).Build(),
			verdictRedirect, nodeAddr, 30081, inet, 20001, loader.ReasonNodePortRevNAT},
		{"remote backend: established ack", false, tcp(inet, 20001, nodeAddr, 30081, packet.ACK).Build(),
			verdictRedirect, nodeAddr, 20001, be1, 8080, loader.ReasonNodePortSNAT},
		{"remote backend: another client on the same port gets another", false, tcp(inet2, 20001, nodeAddr, 30081, packet.SYN).Build(),
			verdictRedirect, nodeAddr, 0, be1, 8080, loader.ReasonNodePortSNAT},
		{"remote backend: udp", false, udp(inet, 5000, nodeAddr, 30084, "q").Build(),
			verdictRedirect, nodeAddr, 5000, be1, 5353, loader.ReasonNodePortSNAT},
		{"remote backend: udp answer", false, udp(be1, 5353, nodeAddr, 5000, "a").Build(),
			verdictRedirect, nodeAddr, 30084, inet, 5000, loader.ReasonNodePortRevNAT},
		{"no endpoints: RST from the frontend", false, tcp(inet, 40002, nodeAddr, 30082, packet.SYN).Build(),
			verdictRedirect, nodeAddr, 30082, inet, 40002, loader.ReasonSvcReject},
		{"eTP Local without a local endpoint: dropped", false, tcp(inet, 40003, nodeAddr, 30083, packet.SYN).Build(),
			verdictShot, netip.Addr{}, 0, netip.Addr{}, 0, loader.ReasonDropNoLocalBackend},
		{"LB IP, client inside the source ranges", false, tcp(inet, 40004, lbIP, 80, packet.SYN).Build(),
			verdictOK, inet, 40004, client, 8080, loader.ReasonNodePortForward},
		{"LB IP, client outside the source ranges: dropped", false, tcp(outsider, 40005, lbIP, 80, packet.SYN).Build(),
			verdictShot, netip.Addr{}, 0, netip.Addr{}, 0, loader.ReasonDropSrcRange},
		{"ClusterIP from outside: not an external frontend", false, tcp(inet, 40006, vip, 80, packet.SYN).Build(),
			verdictOK, inet, 40006, vip, 80, loader.ReasonPass},
	}
	for _, s := range steps {
		prog, dir := h.d.FromNetdev(), loader.DirFromNetdev
		if s.egress {
			prog, dir = h.d.ToNetdev(), loader.DirToNetdev
		}
		before := loadertest.Metric(t, h.m, s.reason, dir)
		v, out := h.run(t, prog, s.frame)
		if v != s.wantVerdict {
			t.Fatalf("%s: verdict %d, want %d", s.name, v, s.wantVerdict)
		}
		if got := loadertest.Metric(t, h.m, s.reason, dir) - before; got != 1 {
			t.Fatalf("%s: %d packets counted under %s/%s, want 1", s.name, got, s.reason, dir)
		}
		if !s.wantSrc.IsValid() {
			continue
		}
		p := parse(t, out)
		if s.reason == loader.ReasonSvcReject {
			if p.TCPFlags&packet.RST == 0 {
				t.Fatalf("%s: flags %#x, want RST", s.name, p.TCPFlags)
			}
		}
		sport := s.wantSport
		if sport == 0 {
			if p.SrcPort == 20001 {
				t.Fatalf("%s: source port 20001 is another flow's", s.name)
			}
			sport = p.SrcPort
		}
		wantAddrPort(t, s.name+": source", p.Src, p.SrcPort, s.wantSrc, sport)
		wantAddrPort(t, s.name+": destination", p.Dst, p.DstPort, s.wantDst, s.wantDport)
	}

	// Every SNAT flow has one reverse entry naming its client and frontend.
	revs, err := h.m.DumpNodePortSNAT()
	if err != nil {
		t.Fatal(err)
	}
	clients := map[netip.AddrPort]netip.AddrPort{}
	for _, v := range revs {
		clients[netip.AddrPortFrom(loader.BEToAddr(v.ClientAddr), loader.BEToPort(v.ClientPort))] =
			netip.AddrPortFrom(loader.BEToAddr(v.FrontAddr), loader.BEToPort(v.FrontPort))
	}
	want := map[netip.AddrPort]netip.AddrPort{
		netip.AddrPortFrom(inet, 20001):  netip.AddrPortFrom(nodeAddr, 30081),
		netip.AddrPortFrom(inet2, 20001): netip.AddrPortFrom(nodeAddr, 30081),
		netip.AddrPortFrom(inet, 5000):   netip.AddrPortFrom(nodeAddr, 30084),
	}
	if fmt.Sprint(clients) != fmt.Sprint(want) {
		t.Fatalf("tern_nodeport_snat clients %v, want %v", clients, want)
	}
}

// TestSourceRangesFromPods: loadBalancerSourceRanges apply to in-cluster clients too: a pod
// outside them reaching the LB IP is dropped, one inside is translated.
func TestSourceRangesFromPods(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	loadertest.PutService(t, m, 5, lbIP.String(), 80, packet.ProtoTCP, loadertest.B(be1.String(), 8080))
	k := loader.ServiceKey{Addr: loader.AddrToBE(lbIP), Port: loader.PortToBE(80), Proto: packet.ProtoTCP}
	if err := m.Services.Put(k, loader.ServiceValue{Id: 5, BackendCount: 1, Flags: loader.SvcFlagExternal | loader.SvcFlagSrcRanges}); err != nil {
		t.Fatal(err)
	}
	if err := m.PutSrcRange(loader.SrcRangeKeyOf(5, netip.MustParsePrefix("10.0.1.10/32"))); err != nil {
		t.Fatal(err)
	}
	v, out := loadertest.Run(t, d.FromPod(), tcp(client, 40000, lbIP, 80, packet.SYN).Build())
	if v != verdictOK {
		t.Fatalf("allowed pod: verdict %d, want TC_ACT_OK", v)
	}
	p := parse(t, out)
	wantAddrPort(t, "allowed pod: destination", p.Dst, p.DstPort, be1, 8080)
	v, _ = loadertest.Run(t, d.FromPod(), tcp(pod2, 40000, lbIP, 80, packet.SYN).Build())
	if v != verdictShot {
		t.Fatalf("pod outside the ranges: verdict %d, want TC_ACT_SHOT", v)
	}
	if n := loadertest.Metric(t, m, loader.ReasonDropSrcRange, loader.DirFromPod); n != 1 {
		t.Fatalf("drop_src_range from-pod = %d, want 1", n)
	}
}

// TestExternalLocalTwin: an externalTrafficPolicy Local frontend without a local endpoint
// drops external clients, while a pod reaching the same address and port gets its
// in-cluster twin's backend (kube-proxy's short-circuit of in-cluster clients).
func TestExternalLocalTwin(t *testing.T) {
	h := newNP(t)
	h.frontend(t, 1, nodeAddr, 30090, packet.ProtoTCP, loader.SvcFlagExternal|loader.SvcFlagExtLocal|loader.SvcFlagDropEmpty)
	loadertest.PutService(t, h.m, 2, "0.0.0.0", 1, packet.ProtoTCP, loadertest.B(be1.String(), 8080))
	twin := loader.ServiceKey{Addr: loader.AddrToBE(nodeAddr), Port: loader.PortToBE(30090), Proto: packet.ProtoTCP, Scope: loader.SvcScopeInternal}
	if err := h.m.Services.Put(twin, loader.ServiceValue{Id: 2, BackendCount: 1, Flags: loader.SvcFlagExternal}); err != nil {
		t.Fatal(err)
	}
	if v, _ := h.run(t, h.d.FromNetdev(), tcp(inet, 40000, nodeAddr, 30090, packet.SYN).Build()); v != verdictShot {
		t.Fatalf("external client: verdict %d, want TC_ACT_SHOT (no local endpoint)", v)
	}
	v, out := loadertest.Run(t, h.d.FromPod(), tcp(client, 40000, nodeAddr, 30090, packet.SYN).Build())
	if v != verdictOK {
		t.Fatalf("pod client: verdict %d, want TC_ACT_OK", v)
	}
	p := parse(t, out)
	wantAddrPort(t, "pod client: destination", p.Dst, p.DstPort, be1, 8080)
}
