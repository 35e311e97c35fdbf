package loader_test

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// The packet tables of the second datapath layout: conntrack by the wire tuple.

type ctHarness struct {
	t *testing.T
	d *loader.Datapath
	m *loader.Maps
}

func newCT(t *testing.T, cfg loader.Config) *ctHarness {
	d := loadertest.New(t, cfg)
	return &ctHarness{t: t, d: d, m: d.Maps()}
}

// forward runs a client's packet through from-pod and returns it as it leaves.
func (h *ctHarness) forward(f packet.Frame) packet.Parsed {
	h.t.Helper()
	v, out := loadertest.Run(h.t, h.d.FromPod(), f.Build())
	if v != verdictOK {
		h.t.Fatalf("forward %s:%d -> %s:%d: verdict %d", f.Src, f.SrcPort, f.Dst, f.DstPort, v)
	}
	return parse(h.t, out)
}

// reply runs a backend's packet through to-pod (into the client) and returns it.
func (h *ctHarness) reply(f packet.Frame) packet.Parsed {
	h.t.Helper()
	v, out := loadertest.Run(h.t, h.d.ToPod(), f.Build())
	if v != verdictOK {
		h.t.Fatalf("reply %s:%d -> %s:%d: verdict %d", f.Src, f.SrcPort, f.Dst, f.DstPort, v)
	}
	return parse(h.t, out)
}

func frame(proto uint8, src netip.Addr, sport uint16, dst netip.Addr, dport uint16, flags uint8) packet.Frame {
	if proto == packet.ProtoTCP {
		return tcp(src, sport, dst, dport, flags)
	}
	return udp(src, sport, dst, dport, "x")
}

func protoName(p uint8) string {
	return map[uint8]string{packet.ProtoTCP: "tcp", packet.ProtoUDP: "udp"}[p]
}

// A client reuses its source port towards two frontends that share their only backend:
// the second flow's wire tuple would be the first one's, so its source port changes, and
// every reply comes back from the frontend its flow used, to the client's own port. For
// TCP the first flow is closing (FIN seen, still within its closing lifetime), the case a
// client's kernel really produces; for UDP both flows are live at once (one socket asking
// two DNS-like Services).
func TestPortReuseAcrossFrontendsSharingABackend(t *testing.T) {
	f1 := netip.MustParseAddr("10.96.0.10")
	f2 := netip.MustParseAddr("10.96.0.20")
	for _, proto := range []uint8{packet.ProtoTCP, packet.ProtoUDP} {
		t.Run(protoName(proto), func(t *testing.T) {
			h := newCT(t, loader.Config{})
			loadertest.PutService(t, h.m, 1, f1.String(), 80, proto, loadertest.B(be1.String(), 8080))
			loadertest.PutService(t, h.m, 2, f2.String(), 80, proto, loadertest.B(be1.String(), 8080))

			out := h.forward(frame(proto, client, 40000, f1, 80, packet.SYN))
			wantAddrPort(t, "flow 1 on the wire", out.Src, out.SrcPort, client, 40000)
			wantAddrPort(t, "flow 1 backend", out.Dst, out.DstPort, be1, 8080)
			in := h.reply(frame(proto, be1, 8080, client, 40000, packet.SYN|packet.ACK))
			wantAddrPort(t, "flow 1 reply", in.Src, in.SrcPort, f1, 80)
			if proto == packet.ProtoTCP {
				h.forward(frame(proto, client, 40000, f1, 80, packet.FIN|packet.ACK))
				h.reply(frame(proto, be1, 8080, client, 40000, packet.FIN|packet.ACK))
			}

			out2 := h.forward(frame(proto, client, 40000, f2, 80, packet.SYN))
			if out2.Dst != be1 || out2.DstPort != 8080 || out2.Src != client {
				t.Fatalf("flow 2 on the wire: %s:%d -> %s:%d", out2.Src, out2.SrcPort, out2.Dst, out2.DstPort)
			}
			if out2.SrcPort < 61000 {
				t.Fatalf("flow 2 kept source port %d although its wire tuple is flow 1's", out2.SrcPort)
			}
			if loadertest.Metric(t, h.m, loader.ReasonSvcPortSNAT, loader.DirFromPod) != 1 {
				t.Fatal("the source-port change is not counted")
			}
			// Later packets of flow 2 keep the same wire port.
			if again := h.forward(frame(proto, client, 40000, f2, 80, packet.ACK)); again.SrcPort != out2.SrcPort {
				t.Fatalf("flow 2 moved from wire port %d to %d", out2.SrcPort, again.SrcPort)
			}

			// Replies of both flows, interleaved: each carries its own frontend.
			for i := 0; i < 3; i++ {
				r2 := h.reply(frame(proto, be1, 8080, client, out2.SrcPort, packet.ACK))
				wantAddrPort(t, "flow 2 reply source", r2.Src, r2.SrcPort, f2, 80)
				wantAddrPort(t, "flow 2 reply destination", r2.Dst, r2.DstPort, client, 40000)
				r1 := h.reply(frame(proto, be1, 8080, client, 40000, packet.ACK))
				wantAddrPort(t, "flow 1 reply source", r1.Src, r1.SrcPort, f1, 80)
			}
		})
	}
}

// Fifty Services selecting the same backend, one client port: every flow answers from its
// own frontend. (The first datapath could reverse-NAT eight.)
func TestFiftyFrontendsShareABackend(t *testing.T) {
	h := newCT(t, loader.Config{})
	fronts := make([]netip.Addr, 50)
	for i := range fronts {
		fronts[i] = netip.MustParseAddr(fmt.Sprintf("10.96.1.%d", i+1))
		loadertest.PutService(t, h.m, uint32(i+1), fronts[i].String(), 53, packet.ProtoUDP, loadertest.B(be1.String(), 5353))
	}
	wire := map[uint16]int{}
	for i, f := range fronts {
		out := h.forward(udp(client, 33333, f, 53, "q"))
		if out.Dst != be1 || out.DstPort != 5353 {
			t.Fatalf("frontend %s went to %s:%d", f, out.Dst, out.DstPort)
		}
		if prev, dup := wire[out.SrcPort]; dup {
			t.Fatalf("frontends %d and %d share wire port %d", prev, i, out.SrcPort)
		}
		wire[out.SrcPort] = i
	}
	for port, i := range wire {
		in := h.reply(udp(be1, 5353, client, port, "a"))
		wantAddrPort(t, fmt.Sprintf("reply to wire port %d", port), in.Src, in.SrcPort, fronts[i], 53)
		wantAddrPort(t, "reply destination", in.Dst, in.DstPort, client, 33333)
	}
}

// A backend that leaves its Service (its membership goes, as the reconciler removes it):
// a long-lived UDP socket's next datagram goes to a live backend, and a new SYN on a tuple
// whose flow used the removed backend does too; an established TCP flow to it continues.
func TestRemovedBackendGetsNoNewTraffic(t *testing.T) {
	h := newCT(t, loader.Config{})
	loadertest.PutService(t, h.m, 1, vip.String(), 53, packet.ProtoUDP, loadertest.B(be1.String(), 53))
	loadertest.PutService(t, h.m, 2, vip.String(), 80, packet.ProtoTCP, loadertest.B(be1.String(), 80))
	if got := h.forward(udp(client, 5000, vip, 53, "q")).Dst; got != be1 {
		t.Fatalf("udp went to %s", got)
	}
	if got := h.forward(tcp(client, 6000, vip, 80, packet.SYN)).Dst; got != be1 {
		t.Fatalf("tcp went to %s", got)
	}
	h.reply(tcp(be1, 80, client, 6000, packet.SYN|packet.ACK))
	if got := h.forward(tcp(client, 7000, vip, 80, packet.SYN)).Dst; got != be1 {
		t.Fatalf("second tcp went to %s", got)
	}
	h.forward(tcp(client, 7000, vip, 80, packet.RST))

	// The reconciler replaces be1 by be2: slot 1 rewritten, be2 a member, be1 not.
	for id, port := range map[uint32]uint16{1: 53, 2: 80} {
		loadertest.PutService(t, h.m, id, vip.String(), port, map[uint32]uint8{1: packet.ProtoUDP, 2: packet.ProtoTCP}[id],
			loadertest.B(be2.String(), port))
		if err := h.m.Members.Delete(loader.MemberKey{SvcId: id, Addr: loader.AddrToBE(be1), Port: loader.PortToBE(port)}); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 3; i++ {
		if got := h.forward(udp(client, 5000, vip, 53, "q")).Dst; got != be2 {
			t.Fatalf("datagram %d from the long-lived socket went to %s, want the live backend %s", i, got, be2)
		}
	}
	if got := h.forward(tcp(client, 6000, vip, 80, packet.ACK)).Dst; got != be1 {
		t.Fatalf("established tcp flow moved to %s; it should continue to its backend", got)
	}
	if got := h.forward(tcp(client, 7000, vip, 80, packet.SYN)).Dst; got != be2 {
		t.Fatalf("new SYN on the reused tuple went to %s, want %s", got, be2)
	}
}

// TCP state: SYN, established once a reply is seen, closing on FIN or RST; each state has
// its lifetime; an entry past its deadline is a new flow.
func TestConntrackStatesAndExpiry(t *testing.T) {
	h := newCT(t, loader.Config{CTTCPSynTimeout: 30e9, CTTCPEstablishedTimeout: 3600e9, CTTCPClosingTimeout: 5e9})
	loadertest.PutService(t, h.m, 1, vip.String(), 80, packet.ProtoTCP, loadertest.B(be1.String(), 8080), loadertest.B(be2.String(), 8080))
	other := netip.MustParseAddr("10.0.3.30")

	type want struct {
		flags    uint16
		lifetime int64 // seconds
	}
	check := func(step string, svc bool, w want) {
		t.Helper()
		ct, err := h.m.DumpCT()
		if err != nil {
			t.Fatal(err)
		}
		var ts unix.Timespec
		unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
		now := ts.Nano()
		n := 0
		for k, v := range ct {
			if !svc && v.Flags&loader.CTFlagSvc != 0 {
				t.Fatalf("%s: unexpected SVC entry %+v", step, k)
			}
			n++
			state := v.Flags & (loader.CTFlagSeenReply | loader.CTFlagClosing)
			if state != w.flags {
				t.Fatalf("%s: entry %+v has state %#x, want %#x", step, k, state, w.flags)
			}
			left := (int64(v.ExpiresNs) - now) / 1e9
			if left < w.lifetime-2 || left > w.lifetime {
				t.Fatalf("%s: entry %+v expires in %d s, want %d s", step, k, left, w.lifetime)
			}
		}
		if n == 0 {
			t.Fatalf("%s: no entry", step)
		}
	}

	// A plain (non-service) flow, seen from both ends of the pod's veth.
	h.forward(tcp(client, 1000, other, 80, packet.SYN))
	check("plain syn", false, want{0, 30})
	h.reply(tcp(other, 80, client, 1000, packet.SYN|packet.ACK))
	check("plain syn-ack", false, want{loader.CTFlagSeenReply, 3600})
	h.forward(tcp(client, 1000, other, 80, packet.FIN|packet.ACK))
	check("plain fin", false, want{loader.CTFlagSeenReply | loader.CTFlagClosing, 5})

	// A service flow: both halves move together.
	for k := range mustDump(t, h.m) {
		h.m.CT.Delete(k)
	}
	first := h.forward(tcp(client, 2000, vip, 80, packet.SYN)).Dst
	check("svc syn", true, want{0, 30})
	h.reply(tcp(first, 8080, client, 2000, packet.SYN|packet.ACK))
	check("svc established", true, want{loader.CTFlagSeenReply, 3600})
	h.reply(tcp(first, 8080, client, 2000, packet.RST))
	check("svc rst", true, want{loader.CTFlagSeenReply | loader.CTFlagClosing, 5})

	// Expiry: push every deadline into the past; the next packet is a new flow, and with
	// two backends 40 new flows cannot all land where the first did (p = 2^-40).
	moved := false
	for i := 0; i < 40 && !moved; i++ {
		for k, v := range mustDump(t, h.m) {
			v.ExpiresNs = 1
			if err := h.m.CT.Put(k, v); err != nil {
				t.Fatal(err)
			}
		}
		moved = h.forward(tcp(client, 2000, vip, 80, packet.ACK)).Dst != first
	}
	if !moved {
		t.Fatal("an expired flow kept its backend: expiry is not honoured")
	}
}

func mustDump(t *testing.T, m *loader.Maps) map[loader.CTKey]loader.CTValue {
	t.Helper()
	ct, err := m.DumpCT()
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

// Either half of a service flow, lost to LRU pressure while the flow is live, is rebuilt
// from the other: the client's packets keep their backend and replies their frontend.
func TestServiceFlowHalvesRebuildEachOther(t *testing.T) {
	h := newCT(t, loader.Config{})
	var bes []loadertest.Backend
	for i := 0; i < 6; i++ {
		bes = append(bes, loadertest.B(fmt.Sprintf("10.0.2.%d", 30+i), 8080))
	}
	loadertest.PutService(t, h.m, 1, vip.String(), 80, packet.ProtoTCP, bes...)
	backend := h.forward(tcp(client, 3000, vip, 80, packet.SYN)).Dst
	h.reply(tcp(backend, 8080, client, 3000, packet.SYN|packet.ACK))

	byKind := func() (loader.CTKey, loader.CTKey) {
		var svc, flow loader.CTKey
		for k, v := range mustDump(t, h.m) {
			if v.Flags&loader.CTFlagSvc != 0 {
				svc = k
			} else {
				flow = k
			}
		}
		return svc, flow
	}
	soon := func(k loader.CTKey) {
		// A deadline near enough that the next packet's refresh moves it by over a second,
		// which is when a half looks after the other.
		var ts unix.Timespec
		unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
		var v loader.CTValue
		if err := h.m.CT.Lookup(k, &v); err != nil {
			t.Fatal(err)
		}
		v.ExpiresNs = uint64(ts.Nano()) + 2e9
		if err := h.m.CT.Put(k, v); err != nil {
			t.Fatal(err)
		}
	}

	svcKey, flowKey := byKind()
	// The translated half goes; the client's next packet rebuilds it, and the reply still finds it.
	if err := h.m.CT.Delete(flowKey); err != nil {
		t.Fatal(err)
	}
	soon(svcKey)
	if got := h.forward(tcp(client, 3000, vip, 80, packet.ACK)).Dst; got != backend {
		t.Fatalf("flow moved to %s", got)
	}
	in := h.reply(tcp(backend, 8080, client, 3000, packet.ACK))
	wantAddrPort(t, "reply after the translated half was rebuilt", in.Src, in.SrcPort, vip, 80)

	// The SVC half goes; a reply rebuilds it, and the client's packets keep their backend.
	if err := h.m.CT.Delete(svcKey); err != nil {
		t.Fatal(err)
	}
	soon(flowKey)
	h.reply(tcp(backend, 8080, client, 3000, packet.ACK))
	if got := h.forward(tcp(client, 3000, vip, 80, packet.ACK)).Dst; got != backend {
		t.Fatalf("after the SVC half was rebuilt from a reply, the flow moved to %s", got)
	}

	// The SVC half goes and no reply comes first: a mid-flow segment finds its backend
	// through the surviving translated half instead of being balanced again.
	for i := 0; i < 20; i++ {
		svcKey, _ = byKind()
		if err := h.m.CT.Delete(svcKey); err != nil {
			t.Fatal(err)
		}
		if got := h.forward(tcp(client, 3000, vip, 80, packet.ACK)).Dst; got != backend {
			t.Fatalf("mid-flow segment with its SVC half gone went to %s, want %s", got, backend)
		}
	}
}

// An idle established service flow whose translated (REVNAT) half the LRU evicted while
// its SVC half survived: the client's next packet, well within the SVC entry's lifetime (so
// its deadline does not move and the halves are not merged), rebuilds the lost half, and the
// backend's reply is translated back to the frontend instead of reaching the client from the
// backend's address (which resets the connection). The chaos map-full test saw this gap.
func TestIdleServiceFlowRebuildsItsLostReplyHalf(t *testing.T) {
	for _, proto := range []uint8{packet.ProtoTCP, packet.ProtoUDP} {
		t.Run(protoName(proto), func(t *testing.T) {
			h := newCT(t, loader.Config{})
			loadertest.PutService(t, h.m, 1, vip.String(), 80, proto, loadertest.B(be1.String(), 8080))
			out := h.forward(frame(proto, client, 3000, vip, 80, packet.SYN))
			wantAddrPort(t, "first packet", out.Dst, out.DstPort, be1, 8080)
			h.reply(frame(proto, be1, 8080, client, 3000, packet.SYN|packet.ACK))
			h.forward(frame(proto, client, 3000, vip, 80, packet.ACK))

			revKey := loader.CTFlowKey(client, 3000, be1, 8080, proto)
			var rev loader.CTValue
			if err := h.m.CT.Lookup(revKey, &rev); err != nil || rev.Flags&loader.CTFlagRevNAT == 0 {
				t.Fatalf("the established flow has no REVNAT half at %+v: %+v, %v", revKey, rev, err)
			}
			if err := h.m.CT.Delete(revKey); err != nil {
				t.Fatal(err)
			}
			out = h.forward(frame(proto, client, 3000, vip, 80, packet.ACK))
			wantAddrPort(t, "client packet after the REVNAT half was lost", out.Dst, out.DstPort, be1, 8080)
			var got loader.CTValue
			if err := h.m.CT.Lookup(revKey, &got); err != nil {
				t.Fatalf("the client's packet did not rebuild the lost REVNAT half: %v", err)
			}
			if got.Flags != rev.Flags || got.NatAddr != rev.NatAddr || got.NatPort != rev.NatPort ||
				got.NatSport != rev.NatSport || got.SvcId != rev.SvcId {
				t.Errorf("rebuilt REVNAT half %+v, want the lost one's %+v", got, rev)
			}
			in := h.reply(frame(proto, be1, 8080, client, 3000, packet.ACK))
			wantAddrPort(t, "reply after the REVNAT half was rebuilt", in.Src, in.SrcPort, vip, 80)
			wantAddrPort(t, "reply's destination", in.Dst, in.DstPort, client, 3000)
		})
	}
}

// A new service flow whose REVNAT half the LRU took before the backend's SYN-ACK (the
// kernel recycles the newest unreferenced entries of a small, busy map first): the SYN-ACK
// finds no entry, is counted as ct_reply_lost and reaches the client untranslated (the
// connection's first attempt fails; nothing else could translate it). The entry to-pod then
// tracks for it at the REVNAT key is a plain flow, not the pair's half: the client's SYN
// retransmission must overwrite it with the rebuilt half, so the retried handshake's reply
// is translated.
func TestHandshakeReplyAfterItsFlowWasEvicted(t *testing.T) {
	h := newCT(t, loader.Config{})
	loadertest.PutService(t, h.m, 1, vip.String(), 80, packet.ProtoTCP, loadertest.B(be1.String(), 8080))
	h.forward(tcp(client, 3000, vip, 80, packet.SYN))
	revKey := loader.CTFlowKey(client, 3000, be1, 8080, packet.ProtoTCP)
	if err := h.m.CT.Delete(revKey); err != nil {
		t.Fatal(err)
	}
	lost := loadertest.Metric(t, h.m, loader.ReasonCTReplyLost, loader.DirToPod)
	in := h.reply(tcp(be1, 8080, client, 3000, packet.SYN|packet.ACK))
	wantAddrPort(t, "SYN-ACK with its flow's entries gone (passed as it is)", in.Src, in.SrcPort, be1, 8080)
	if got := loadertest.Metric(t, h.m, loader.ReasonCTReplyLost, loader.DirToPod) - lost; got != 1 {
		t.Errorf("ct_reply_lost counted %d for the untracked SYN-ACK, want 1", got)
	}
	out := h.forward(tcp(client, 3000, vip, 80, packet.SYN))
	wantAddrPort(t, "the client's SYN retransmission", out.Dst, out.DstPort, be1, 8080)
	in = h.reply(tcp(be1, 8080, client, 3000, packet.SYN|packet.ACK))
	wantAddrPort(t, "the retried handshake's SYN-ACK", in.Src, in.SrcPort, vip, 80)
	// An established flow's reply that found no entry (the server's first data right after
	// the handshake, say) is lost the same way: counted too. A RST is not (it is what a
	// kernel answers a tuple it does not know with).
	lost = loadertest.Metric(t, h.m, loader.ReasonCTReplyLost, loader.DirToPod)
	h.forward(tcp(client, 3000, vip, 80, packet.ACK))
	if err := h.m.CT.Delete(revKey); err != nil {
		t.Fatal(err)
	}
	h.reply(tcp(be1, 8080, client, 3000, packet.ACK))
	if got := loadertest.Metric(t, h.m, loader.ReasonCTReplyLost, loader.DirToPod) - lost; got != 1 {
		t.Errorf("ct_reply_lost counted %d for a mid-flow segment, want 1", got)
	}
	if err := h.m.CT.Delete(revKey); err != nil {
		t.Fatal(err)
	}
	lost = loadertest.Metric(t, h.m, loader.ReasonCTReplyLost, loader.DirToPod)
	h.reply(tcp(be1, 8080, client, 3000, packet.RST))
	if got := loadertest.Metric(t, h.m, loader.ReasonCTReplyLost, loader.DirToPod) - lost; got != 0 {
		t.Errorf("ct_reply_lost counted %d for a RST, want 0", got)
	}
	// ... and the client's next packet repairs the pair all the same.
	h.forward(tcp(client, 3000, vip, 80, packet.ACK))
	in = h.reply(tcp(be1, 8080, client, 3000, packet.ACK))
	wantAddrPort(t, "reply once the client's packet replaced the plain entry", in.Src, in.SrcPort, vip, 80)
}

// Capacity: a conntrack map of N entries holds N live flows inserted from one CPU, less at
// most the 128 spare entries each other CPU may keep on its local free list (the kernel's
// LOCAL_FREE_TARGET; the Go thread running the test moves between CPUs). Per-CPU LRU lists
// held about N/CPUs. Past N the least recently used flows go first.
func TestConntrackHoldsItsSize(t *testing.T) {
	const n = 8192
	h := newCT(t, loader.Config{MaxFlows: n})
	dst := netip.MustParseAddr("10.0.3.30")
	src := func(i int) (netip.Addr, uint16) {
		return netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), uint16(1024 + i%60000)
	}
	for i := 0; i < n; i++ {
		a, p := src(i)
		h.forward(udp(a, p, dst, 53, "q"))
	}
	ct := mustDump(t, h.m)
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	if floor := n - 128*(cpus-1); len(ct) < floor {
		t.Fatalf("a map of %d entries holds %d flows inserted from one CPU, want at least %d on %d CPUs", n, len(ct), floor, cpus)
	}
	t.Logf("%d of %d flows held", len(ct), n)
	// Keep the first half warm, then insert n/4 more: the evicted ones are cold flows.
	for i := 0; i < n/2; i++ {
		a, p := src(i)
		h.forward(udp(a, p, dst, 53, "q"))
	}
	for i := n; i < n+n/4; i++ {
		a, p := src(i)
		h.forward(udp(a, p, dst, 53, "q"))
	}
	ct = mustDump(t, h.m)
	warmLost := 0
	for i := 0; i < n/2; i++ {
		a, p := src(i)
		k := loader.CTFlowKey(a, p, dst, 53, packet.ProtoUDP)
		if _, ok := ct[k]; !ok {
			warmLost++
		}
	}
	if warmLost > n/100 {
		t.Fatalf("%d of %d recently used flows were evicted while cold ones remained", warmLost, n/2)
	}
}
