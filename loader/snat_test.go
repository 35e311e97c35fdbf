package loader_test

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// Masquerade packet tables (bpf/lib/snat.h) run on the netdev programs with
// BPF_PROG_TEST_RUN: a local pod's packet leaving for an address outside the
// non-masquerade set, what comes back, and the state both leave in tern_conntrack and
// tern_snat.

var (
	nodeAddr = netip.MustParseAddr("10.0.0.10")
	inet     = netip.MustParseAddr("203.0.113.10")
	pod2     = netip.MustParseAddr("10.0.1.11")
)

type masq struct {
	d *loader.Datapath
	m *loader.Maps
}

func newMasq(t *testing.T, cfg loader.Config) *masq {
	t.Helper()
	cfg.MasqAddr = nodeAddr
	d := loadertest.New(t, cfg)
	m := d.Maps()
	for _, a := range []netip.Addr{client, pod2} {
		if err := m.PutIPCache(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(a)},
			loader.IPCacheValue{Flags: loader.IPCacheFlagLocal | loader.IPCacheFlagPod}); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.SetNonMasquerade([]netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("169.254.0.0/16")}); err != nil {
		t.Fatal(err)
	}
	return &masq{d: d, m: m}
}

// out runs tern_to_netdev and wants TC_ACT_OK and valid checksums.
func (h *masq) out(t *testing.T, f []byte) packet.Parsed {
	t.Helper()
	v, out := loadertest.Run(t, h.d.ToNetdev(), f)
	if v != verdictOK {
		t.Fatalf("tern_to_netdev verdict %d, want TC_ACT_OK", v)
	}
	return parse(t, out[:len(f)])
}

func (h *masq) in(t *testing.T, f []byte) packet.Parsed {
	t.Helper()
	v, out := loadertest.Run(t, h.d.FromNetdev(), f)
	if v != verdictOK {
		t.Fatalf("tern_from_netdev verdict %d, want TC_ACT_OK", v)
	}
	return parse(t, out[:len(f)])
}

// icmpEcho is an echo request (typ 8) or reply (0) with identifier id.
func icmpEcho(src, dst netip.Addr, typ uint8, id uint16) []byte {
	l4 := make([]byte, 8+4)
	l4[0] = typ
	binary.BigEndian.PutUint16(l4[4:], id)
	binary.BigEndian.PutUint16(l4[6:], 1)
	copy(l4[8:], "ping")
	binary.BigEndian.PutUint16(l4[2:], packet.Checksum(l4))
	return packet.Frame{SrcMAC: podMAC, DstMAC: hostMAC, Src: src, Dst: dst, Proto: packet.ProtoICMP, L4Raw: l4, ID: 5}.Build()
}

func icmpID(p packet.Parsed) uint16 { return binary.BigEndian.Uint16(p.L4[4:]) }

// TestMasqueradeFlows: a new flow keeps the pod's port on the node's address, an
// established packet finds the same translation, the reply is restored to the pod — TCP,
// UDP and ICMP echo (its identifier as the port) — and each flow has one conntrack entry
// holding the translation and one NAT entry keyed by the translated tuple.
func TestMasqueradeFlows(t *testing.T) {
	h := newMasq(t, loader.Config{})
	type step struct {
		name      string
		egress    bool
		frame     []byte
		wantSrc   netip.Addr
		wantSport uint16 // ICMP: identifier
		wantDst   netip.Addr
		wantDport uint16
	}
	steps := []step{
		{"tcp syn", true, tcp(client, 20000, inet, 443, packet.SYN).Build(), nodeAddr, 20000, inet, 443},
		{"tcp syn-ack", false, tcp(inet, 443, nodeAddr, 20000, packet.SYN|packet.ACK).Build(), inet, 443, client, 20000},
		{"tcp ack", true, tcp(client, 20000, inet, 443, packet.ACK).Build(), nodeAddr, 20000, inet, 443},
		{"tcp data back", false, tcp(inet, 443, nodeAddr, 20000, packet.ACK|packet.PSH).Build(), inet, 443, client, 20000},
		{"udp query", true, udp(client, 20001, inet, 53, "q").Build(), nodeAddr, 20001, inet, 53},
		{"udp answer", false, udp(inet, 53, nodeAddr, 20001, "a").Build(), inet, 53, client, 20001},
		{"echo request", true, icmpEcho(client, inet, 8, 777), nodeAddr, 777, inet, 0},
		{"echo reply", false, icmpEcho(inet, nodeAddr, 0, 777), inet, 0, client, 777},
	}
	for _, s := range steps {
		var p packet.Parsed
		if s.egress {
			p = h.out(t, s.frame)
		} else {
			p = h.in(t, s.frame)
		}
		sp, dp := p.SrcPort, p.DstPort
		if p.Proto == packet.ProtoICMP {
			sp, dp = 0, 0
			if s.egress {
				sp = icmpID(p)
			} else {
				dp = icmpID(p)
			}
		}
		wantAddrPort(t, s.name+" source", p.Src, sp, s.wantSrc, s.wantSport)
		wantAddrPort(t, s.name+" destination", p.Dst, dp, s.wantDst, s.wantDport)
	}
	if got := loadertest.Metric(t, h.m, loader.ReasonMasq, loader.DirToNetdev); got != 4 {
		t.Errorf("masq/to-netdev = %d, want 4", got)
	}
	if got := loadertest.Metric(t, h.m, loader.ReasonMasqRestore, loader.DirFromNetdev); got != 4 {
		t.Errorf("masq_restore/from-netdev = %d, want 4", got)
	}

	snat, err := h.m.DumpSNAT()
	if err != nil {
		t.Fatal(err)
	}
	ct, err := h.m.DumpCT()
	if err != nil {
		t.Fatal(err)
	}
	if len(snat) != 3 || len(ct) != 3 {
		t.Fatalf("%d NAT and %d conntrack entries, want 3 and 3 (one each per flow)", len(snat), len(ct))
	}
	for _, f := range []struct {
		proto        uint8
		sport, dport uint16
	}{{packet.ProtoTCP, 20000, 443}, {packet.ProtoUDP, 20001, 53}, {packet.ProtoICMP, 777, 0}} {
		nk := loader.CTFlowKey(nodeAddr, f.sport, inet, f.dport, f.proto)
		nv, ok := snat[nk]
		if !ok || loader.BEToAddr(nv.OrigAddr) != client || loader.BEToPort(nv.OrigPort) != f.sport {
			t.Errorf("proto %d: NAT entry %+v (present %v), want the pod %s:%d", f.proto, nv, ok, client, f.sport)
		}
		cv, ok := ct[loader.CTFlowKey(client, f.sport, inet, f.dport, f.proto)]
		if !ok || cv.Flags&loader.CTFlagSNAT == 0 || loader.BEToAddr(cv.NatAddr) != nodeAddr ||
			loader.BEToPort(cv.NatSport) != f.sport {
			t.Errorf("proto %d: conntrack entry %+v (present %v), want CT_F_SNAT to %s:%d", f.proto, cv, ok, nodeAddr, f.sport)
		}
	}
	// Map pressure (tern_datapath_map_entries / _capacity) counts them.
	pr, err := h.m.Pressure()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, p := range pr {
		if p.Name == loader.PodMapTernSnat {
			found = p.Entries == 3 && p.Capacity == 131072
		}
	}
	if !found {
		t.Errorf("map pressure %+v: want tern_snat with 3 of 131072 entries", pr)
	}
	// The TCP flow saw its reply: its NAT entry lives by the established lifetime.
	nv := snat[loader.CTFlowKey(nodeAddr, 20000, inet, 443, packet.ProtoTCP)]
	if nv.Flags&loader.CTFlagSeenReply == 0 || nv.ExpiresNs < loader.MonotonicNow()+3600e9 {
		t.Errorf("TCP NAT entry after the handshake: flags %#x, %ds left; want SEEN_REPLY and the established lifetime",
			nv.Flags, int64(nv.ExpiresNs-loader.MonotonicNow())/1e9)
	}
}

// TestMasqueradeLeavesOtherTrafficAlone: a pod's traffic inside the VPC (the non-masquerade
// set) and the node's own traffic are not translated, and a packet to the node that belongs
// to no masqueraded flow is not restored.
func TestMasqueradeLeavesOtherTrafficAlone(t *testing.T) {
	h := newMasq(t, loader.Config{})
	for _, c := range []struct {
		name   string
		egress bool
		frame  []byte
	}{
		{"pod to pod in the VPC", true, tcp(client, 20000, be1, 8080, packet.SYN).Build()},
		{"pod to link-local", true, udp(client, 20000, netip.MustParseAddr("169.254.10.1"), 80, "x").Build()},
		{"node's own traffic", true, tcp(nodeAddr, 20000, inet, 443, packet.SYN).Build()},
		{"a remote pod through this node", true, tcp(netip.MustParseAddr("10.0.9.9"), 20000, inet, 443, packet.SYN).Build()},
		{"to the node, no flow", false, tcp(inet, 443, nodeAddr, 20000, packet.SYN|packet.ACK).Build()},
	} {
		prog := h.d.FromNetdev()
		if c.egress {
			prog = h.d.ToNetdev()
		}
		v, out := loadertest.Run(t, prog, c.frame)
		if v != verdictOK || string(out[:len(c.frame)]) != string(c.frame) {
			t.Errorf("%s: verdict %d, frame changed %v; want it untouched", c.name, v, string(out[:len(c.frame)]) != string(c.frame))
		}
	}
	if snat, err := h.m.DumpSNAT(); err != nil || len(snat) != 0 {
		t.Fatalf("NAT entries %v (err %v), want none", snat, err)
	}
}

// TestMasqueradePortCollision: two pods using the same port towards one remote endpoint get
// different ports on the node's address, each reply goes to its own pod, and a flow whose
// conntrack entry was lost (LRU) takes its own translation back, not a new port.
func TestMasqueradePortCollision(t *testing.T) {
	h := newMasq(t, loader.Config{})
	p1 := h.out(t, tcp(client, 20000, inet, 443, packet.SYN).Build())
	p2 := h.out(t, tcp(pod2, 20000, inet, 443, packet.SYN).Build())
	if p1.SrcPort != 20000 {
		t.Fatalf("first pod's port became %d, want its own 20000", p1.SrcPort)
	}
	cfg := h.d.Config()
	if p2.SrcPort == 20000 || p2.SrcPort < cfg.SNATPortMin || int(p2.SrcPort) >= int(cfg.SNATPortMin)+int(cfg.SNATPortCount) {
		t.Fatalf("second pod's port %d, want another one in %d+%d", p2.SrcPort, cfg.SNATPortMin, cfg.SNATPortCount)
	}
	r1 := h.in(t, tcp(inet, 443, nodeAddr, p1.SrcPort, packet.SYN|packet.ACK).Build())
	r2 := h.in(t, tcp(inet, 443, nodeAddr, p2.SrcPort, packet.SYN|packet.ACK).Build())
	wantAddrPort(t, "reply to the first pod", r1.Dst, r1.DstPort, client, 20000)
	wantAddrPort(t, "reply to the second pod", r2.Dst, r2.DstPort, pod2, 20000)

	if err := h.m.CT.Delete(loader.CTFlowKey(pod2, 20000, inet, 443, packet.ProtoTCP)); err != nil {
		t.Fatal(err)
	}
	again := h.out(t, tcp(pod2, 20000, inet, 443, packet.ACK).Build())
	if again.SrcPort != p2.SrcPort {
		t.Fatalf("after losing its conntrack entry the second pod's flow left as port %d, want its own %d", again.SrcPort, p2.SrcPort)
	}
	st, err := h.m.SNATStatsTotals()
	if err != nil {
		t.Fatal(err)
	}
	if st.Allocations != 3 || st.Tries < 4 || st.Failures != 0 {
		t.Fatalf("allocation counters %+v, want 3 allocations (two new, one taken back), ≥4 tries, no failure", st)
	}
}

// TestMasqueradeExhaustion: when the pod's port and every candidate of a small range are
// live flows of others, the new flow is dropped and counted (drop_snat_no_port); once one
// of them expires, its port is free again.
func TestMasqueradeExhaustion(t *testing.T) {
	// The node's ephemeral range is set below the SNAT range, so all of its two ports are candidates.
	h := newMasq(t, loader.Config{SNATPortMin: 50000, SNATPortCount: 2, SNATTries: 16, LocalPortRange: loader.PortRange{Min: 32768, Max: 49999}})
	other := loader.AddrToBE(netip.MustParseAddr("10.0.1.99"))
	far := loader.MonotonicNow() + 3600e9
	for i, port := range []uint16{20000, 50000, 50001} {
		k := loader.CTFlowKey(nodeAddr, port, inet, 443, packet.ProtoTCP)
		if err := h.m.SNAT.Put(k, loader.SNATValue{ExpiresNs: far, OrigAddr: other, OrigPort: loader.PortToBE(uint16(1000 + i))}); err != nil {
			t.Fatal(err)
		}
	}
	syn := tcp(client, 20000, inet, 443, packet.SYN).Build()
	if v, _ := loadertest.Run(t, h.d.ToNetdev(), syn); v != verdictShot {
		t.Fatalf("verdict %d with every port taken, want TC_ACT_SHOT", v)
	}
	if got := loadertest.Metric(t, h.m, loader.ReasonDropSNATNoPort, loader.DirToNetdev); got != 1 {
		t.Fatalf("drop_snat_no_port = %d, want 1", got)
	}
	st, err := h.m.SNATStatsTotals()
	if err != nil {
		t.Fatal(err)
	}
	if st.Failures != 1 || st.Tries != 16 {
		t.Fatalf("allocation counters %+v, want 1 failure after 16 tries", st)
	}

	// One of them expires: the next attempt takes its port.
	k := loader.CTFlowKey(nodeAddr, 50001, inet, 443, packet.ProtoTCP)
	if err := h.m.SNAT.Put(k, loader.SNATValue{ExpiresNs: 1, OrigAddr: other, OrigPort: loader.PortToBE(1002)}); err != nil {
		t.Fatal(err)
	}
	p := h.out(t, syn)
	wantAddrPort(t, "source after one expired", p.Src, p.SrcPort, nodeAddr, 50001)
}

// TestMasqueradeICMPErrorRestore: an ICMP error a router sends about a translated packet
// (to the node's address, quoting the node's address and port) reaches the pod with the
// quoted header and the destination restored and every checksum valid; TCP and ICMP echo.
func TestMasqueradeICMPErrorRestore(t *testing.T) {
	h := newMasq(t, loader.Config{})
	router := netip.MustParseAddr("198.51.100.1")
	for _, c := range []struct {
		name    string
		egress  []byte
		typ     uint8
		wantSrc uint16 // the quoted port or identifier the pod must see
	}{
		{"udp port unreachable", udp(client, 20001, inet, 53, "q").Build(), 3, 20001},
		{"echo time exceeded", icmpEcho(client, inet, 8, 4242), 11, 4242},
	} {
		sent := h.out(t, c.egress)
		// The error quotes the translated IP header and the first 8 bytes after it.
		raw := sent.L4
		quote := append([]byte{}, c.egress[packet.EthLen:packet.EthLen+20]...)
		quote = append(quote, raw[:8]...)
		// The quoted header as it was on the wire: the node's address, its checksum.
		copy(quote[12:16], nodeAddr.AsSlice())
		quote[10], quote[11] = 0, 0
		binary.BigEndian.PutUint16(quote[10:], packet.Checksum(quote[:20]))
		l4 := append(make([]byte, 8), quote...)
		l4[0] = c.typ
		binary.BigEndian.PutUint16(l4[2:], packet.Checksum(l4))
		errFrame := packet.Frame{SrcMAC: podMAC, DstMAC: hostMAC, Src: router, Dst: nodeAddr, Proto: packet.ProtoICMP, L4Raw: l4, ID: 11}.Build()

		// Cut short by its IPv4 total length (the quote's ports, or its echo identifier, in
		// the frame's padding): no part of the packet, left alone.
		for _, ipLen := range []int{20 + 8 + 20, 20 + 8 + 20 + 7} {
			short := cutShort(errFrame, ipLen)
			if v, out := loadertest.Run(t, h.d.FromNetdev(), short); v != verdictOK || !bytes.Equal(out[:len(short)], short) {
				t.Fatalf("%s cut short at %d bytes: verdict %d, changed %v; want it passed unchanged", c.name, ipLen, v, !bytes.Equal(out[:len(short)], short))
			}
		}
		p := h.in(t, errFrame)
		if p.Dst != client {
			t.Fatalf("%s: outer destination %s, want the pod %s", c.name, p.Dst, client)
		}
		in := p.L4[8:]
		if got := netip.AddrFrom4([4]byte(in[12:16])); got != client {
			t.Fatalf("%s: quoted source %s, want the pod %s", c.name, got, client)
		}
		if packet.Checksum(in[:20]) != 0 {
			t.Fatalf("%s: quoted IPv4 header checksum invalid", c.name)
		}
		port := binary.BigEndian.Uint16(in[20:])
		if in[9] == packet.ProtoICMP {
			port = binary.BigEndian.Uint16(in[24:])
		}
		if port != c.wantSrc {
			t.Fatalf("%s: quoted source port %d, want %d", c.name, port, c.wantSrc)
		}
	}
	if got := loadertest.Metric(t, h.m, loader.ReasonMasqRestore, loader.DirFromNetdev); got != 2 {
		t.Fatalf("masq_restore/from-netdev = %d, want 2", got)
	}
}

// TestMasqueradeExpiry: a NAT entry follows its flow's conntrack state (a FIN shortens it to
// the closing lifetime); an expired entry restores nothing and is deleted by GC, which
// keeps the live ones.
func TestMasqueradeExpiry(t *testing.T) {
	h := newMasq(t, loader.Config{})
	h.out(t, tcp(client, 20000, inet, 443, packet.SYN).Build())
	h.in(t, tcp(inet, 443, nodeAddr, 20000, packet.SYN|packet.ACK).Build())
	h.out(t, tcp(client, 20000, inet, 443, packet.FIN|packet.ACK).Build())
	h.out(t, udp(client, 20001, inet, 53, "q").Build())

	tk := loader.CTFlowKey(nodeAddr, 20000, inet, 443, packet.ProtoTCP)
	var v loader.SNATValue
	if err := h.m.SNAT.Lookup(tk, &v); err != nil {
		t.Fatal(err)
	}
	left := int64(v.ExpiresNs) - int64(loader.MonotonicNow())
	if v.Flags&loader.CTFlagClosing == 0 || left > 11e9 {
		t.Fatalf("after FIN: flags %#x, %d ms left; want CLOSING and the 10 s closing lifetime", v.Flags, left/1e6)
	}
	// Let the TCP flow's deadline pass (as time would) and collect.
	v.ExpiresNs = 1
	if err := h.m.SNAT.Put(tk, v); err != nil {
		t.Fatal(err)
	}
	rep := tcp(inet, 443, nodeAddr, 20000, packet.ACK).Build()
	p := h.in(t, rep)
	if p.Dst != nodeAddr {
		t.Fatalf("a reply on an expired flow went to %s, want it left to the node", p.Dst)
	}
	deleted, live, err := h.m.GCSNAT(loader.MonotonicNow())
	if err != nil {
		t.Fatal(err)
	}
	if deleted != 1 || live != 1 {
		t.Fatalf("GC deleted %d and kept %d, want 1 and 1 (the live UDP flow)", deleted, live)
	}
	if err := h.m.SNAT.Lookup(tk, &v); !loader.IsNotExist(err) {
		t.Fatalf("expired entry still present after GC (err %v)", err)
	}
}
