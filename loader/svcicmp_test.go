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

// icmpErrorAbout builds the ICMP error (type, code) that from sends to the sender of sent,
// a frame as it left tern_from_pod: its IPv4 header and first 8 bytes after it are quoted.
func icmpErrorAbout(from netip.Addr, typ, code uint8, sent []byte) []byte {
	ip := sent[packet.EthLen:]
	quote := append([]byte{}, ip[:20+8]...)
	l4 := append(make([]byte, 8), quote...)
	l4[0], l4[1] = typ, code
	if typ == 3 && code == 4 { // fragmentation needed: the next hop's MTU
		binary.BigEndian.PutUint16(l4[6:], 1400)
	}
	binary.BigEndian.PutUint16(l4[2:], packet.Checksum(l4))
	src := netip.AddrFrom4([4]byte(ip[12:16]))
	return packet.Frame{SrcMAC: hostMAC, DstMAC: podMAC, Src: from, Dst: src, Proto: packet.ProtoICMP, L4Raw: l4, ID: 13}.Build()
}

// cutShort returns a copy of frame whose IPv4 total length says the packet ends after ipLen
// bytes, the rest of the frame being padding (the header checksum kept right).
func cutShort(frame []byte, ipLen int) []byte {
	f := append([]byte{}, frame...)
	ip := f[packet.EthLen:]
	binary.BigEndian.PutUint16(ip[2:], uint16(ipLen))
	ip[10], ip[11] = 0, 0
	binary.BigEndian.PutUint16(ip[10:], packet.Checksum(ip[:20]))
	return f
}

// quoted is the quoted header of an ICMP error: addresses, ports, and whether its IPv4
// checksum is right.
type quoted struct {
	src, dst     netip.Addr
	sport, dport uint16
	ipSumOK      bool
}

func quoteOf(t *testing.T, p packet.Parsed) quoted {
	t.Helper()
	if len(p.L4) < 8+20+4 {
		t.Fatalf("ICMP error of %d bytes quotes no header", len(p.L4))
	}
	in := p.L4[8:]
	return quoted{
		src: netip.AddrFrom4([4]byte(in[12:16])), dst: netip.AddrFrom4([4]byte(in[16:20])),
		sport: binary.BigEndian.Uint16(in[20:]), dport: binary.BigEndian.Uint16(in[22:]),
		ipSumOK: packet.Checksum(in[:20]) == 0,
	}
}

// TestServiceICMPErrorsTurnedBack: an ICMP error about a service flow's translated packet
// (a backend's port unreachable, a router's fragmentation needed) reaches the client with
// the quote it sent (frontend address and port, its own source port where the wire port
// differed) and the frontend as the outer source, every checksum right (the outer IPv4 and
// ICMP sums checked by parse, the quoted IPv4 sum here), counted svc_icmp_error; an error
// about a flow straight to a pod, or quoting a packet of someone else, passes as it came.
func TestServiceICMPErrorsTurnedBack(t *testing.T) {
	router := netip.MustParseAddr("198.51.100.1")
	f2 := netip.MustParseAddr("10.96.0.20")
	h := newCT(t, loader.Config{})
	counted := func() uint64 { return loadertest.Metric(t, h.m, loader.ReasonSvcICMPError, loader.DirToPod) }
	errorIn := func(what string, f []byte) packet.Parsed {
		t.Helper()
		v, out := loadertest.Run(t, h.d.ToPod(), f)
		if v != verdictOK {
			t.Fatalf("%s: tern_to_pod verdict %d, want TC_ACT_OK", what, v)
		}
		p := parse(t, out[:len(f)])
		if p.Proto != packet.ProtoICMP {
			t.Fatalf("%s: came out as protocol %d", what, p.Proto)
		}
		return p
	}

	for i, proto := range []uint8{packet.ProtoTCP, packet.ProtoUDP} {
		id := uint32(2*i + 1)
		loadertest.PutService(t, h.m, id, vip.String(), 80, proto, loadertest.B(be1.String(), 8080))
		loadertest.PutService(t, h.m, id+1, f2.String(), 80, proto, loadertest.B(be1.String(), 8080))
	}
	// send runs a client's packet through tern_from_pod and returns it as it leaves.
	send := func(f []byte) []byte {
		t.Helper()
		v, out := loadertest.Run(t, h.d.FromPod(), f)
		if v != verdictOK {
			t.Fatalf("tern_from_pod verdict %d, want TC_ACT_OK", v)
		}
		return out[:len(f)]
	}

	// A UDP flow whose backend has no socket on the port: the backend's port unreachable.
	sent := send(udp(client, 40000, vip, 80, "q").Build())
	p := errorIn("udp port unreachable", icmpErrorAbout(be1, 3, 3, sent))
	wantAddrPort(t, "port unreachable's outer source", p.Src, 0, vip, 0)
	if p.Dst != client {
		t.Fatalf("port unreachable went to %s, want the client %s", p.Dst, client)
	}
	q := quoteOf(t, p)
	wantAddrPort(t, "quoted source", q.src, q.sport, client, 40000)
	wantAddrPort(t, "quoted destination", q.dst, q.dport, vip, 80)
	if !q.ipSumOK {
		t.Fatal("quoted IPv4 header checksum wrong")
	}
	if got := counted(); got != 1 {
		t.Fatalf("svc_icmp_error counted %d, want 1", got)
	}

	// The same client port to a second frontend on the same backend: the wire port moves,
	// and an error about it quotes the client's own port again.
	sent2 := send(udp(client, 40000, f2, 80, "q").Build())
	moved, err := packet.Parse(sent2)
	if err != nil {
		t.Fatal(err)
	}
	if moved.SrcPort == 40000 {
		t.Fatal("the second flow kept the first one's wire tuple: no port translation to test")
	}
	q = quoteOf(t, errorIn("udp port unreachable, moved port", icmpErrorAbout(be1, 3, 3, sent2)))
	wantAddrPort(t, "moved flow's quoted source", q.src, q.sport, client, 40000)
	wantAddrPort(t, "moved flow's quoted destination", q.dst, q.dport, f2, 80)

	// A TCP SYN on a path with a smaller MTU: a router's fragmentation needed.
	syn := send(tcp(client, 40001, vip, 80, packet.SYN).Build())
	p = errorIn("tcp fragmentation needed", icmpErrorAbout(router, 3, 4, syn))
	wantAddrPort(t, "fragmentation needed's outer source", p.Src, 0, vip, 0)
	if mtu := binary.BigEndian.Uint16(p.L4[6:]); mtu != 1400 {
		t.Fatalf("the next-hop MTU became %d", mtu)
	}
	q = quoteOf(t, p)
	wantAddrPort(t, "quoted SYN source", q.src, q.sport, client, 40001)
	wantAddrPort(t, "quoted SYN destination", q.dst, q.dport, vip, 80)
	if got := counted(); got != 3 {
		t.Fatalf("svc_icmp_error counted %d, want 3", got)
	}

	// Left alone: an error about a flow straight to a pod, and one quoting a packet the
	// pod did not send (its quoted source is another address).
	direct := send(udp(client, 40002, be2, 8080, "q").Build())
	other := append([]byte{}, sent...)
	copy(other[packet.EthLen+12:], pod2.AsSlice())
	otherErr := icmpErrorAbout(be1, 3, 3, other)
	// Addressed to the client all the same.
	otherErr = packet.Frame{SrcMAC: hostMAC, DstMAC: podMAC, Src: be1, Dst: client, Proto: packet.ProtoICMP,
		L4Raw: otherErr[packet.EthLen+20:], ID: 13}.Build()
	for _, c := range []struct {
		name string
		f    []byte
	}{{"error about a direct flow", icmpErrorAbout(be2, 3, 3, direct)}, {"error quoting another sender", otherErr}} {
		p := errorIn(c.name, c.f)
		if string(p.L4) != string(c.f[packet.EthLen+20:]) || p.Src != netip.AddrFrom4([4]byte(c.f[packet.EthLen+12:packet.EthLen+16])) {
			t.Fatalf("%s was changed", c.name)
		}
	}
	if got := counted(); got != 3 {
		t.Fatalf("svc_icmp_error counted %d after errors not about service flows, want 3", got)
	}

	// An error whose IPv4 total length ends before the quoted ports, which lie in the frame's
	// padding: no part of the packet, never read as a quote (the fuzzer found one rewritten).
	for _, ipLen := range []int{20 + 2, 20 + 8 + 20, 20 + 8 + 20 + 3} {
		short := cutShort(icmpErrorAbout(be1, 3, 3, sent), ipLen)
		v, out := loadertest.Run(t, h.d.ToPod(), short)
		if v == verdictRedirect || (v == verdictOK && !bytes.Equal(out[:len(short)], short)) {
			t.Fatalf("an error cut short at %d bytes: verdict %d, changed %v; want it left alone", ipLen, v, !bytes.Equal(out[:len(short)], short))
		}
	}
	if got := counted(); got != 3 {
		t.Fatalf("svc_icmp_error counted %d after errors cut short, want 3", got)
	}
}

// TestNodePortICMPErrorsTurnedBack: the netdev path's side of the same (bpf/lib/svcicmp.h,
// nodeport.h): an external client's flow to a local backend (DNAT only) gets the backend's
// port unreachable with the frontend in the quote and as the outer source, out where the
// FIB sends it (tern_to_netdev); a flow to a remote backend (DNAT and SNAT to the node) gets
// the remote backend's port unreachable and a router's fragmentation needed, which arrive
// at the node's address, turned back to the client (tern_from_netdev); counted
// svc_icmp_error in both directions. An error about the node's own flow passes.
func TestNodePortICMPErrorsTurnedBack(t *testing.T) {
	h := newNP(t)
	router := netip.MustParseAddr("198.51.100.1")
	ext := uint16(loader.SvcFlagExternal)
	h.frontend(t, 1, nodeAddr, 30090, packet.ProtoUDP, ext, loadertest.B(client.String(), 5999)) // local backend
	h.frontend(t, 2, nodeAddr, 30091, packet.ProtoUDP, ext, loadertest.B(be1.String(), 5999))    // remote backend
	h.frontend(t, 3, nodeAddr, 30092, packet.ProtoTCP, ext, loadertest.B(be1.String(), 8080))
	counted := func(dir loader.Direction) uint64 {
		return loadertest.Metric(t, h.m, loader.ReasonSvcICMPError, dir)
	}
	step := func(what string, egress bool, f []byte, want uint32) packet.Parsed {
		t.Helper()
		prog := h.d.FromNetdev()
		if egress {
			prog = h.d.ToNetdev()
		}
		v, out := h.run(t, prog, f)
		if v != want {
			t.Fatalf("%s: verdict %d, want %d", what, v, want)
		}
		return parse(t, out[:len(f)])
	}
	// wantError checks an error that must reach inet:port as the answer of frontend.
	wantError := func(what string, p packet.Parsed, port uint16, front netip.AddrPort) {
		t.Helper()
		if p.Src != front.Addr() || p.Dst != inet {
			t.Fatalf("%s: outer %s -> %s, want %s -> %s", what, p.Src, p.Dst, front.Addr(), inet)
		}
		q := quoteOf(t, p)
		wantAddrPort(t, what+": quoted source", q.src, q.sport, inet, port)
		wantAddrPort(t, what+": quoted destination", q.dst, q.dport, front.Addr(), front.Port())
		if !q.ipSumOK {
			t.Fatalf("%s: quoted IPv4 header checksum wrong", what)
		}
	}

	local := step("udp to a local backend", false, udp(inet, 6000, nodeAddr, 30090, "q").Build(), verdictOK)
	wantAddrPort(t, "translated to the local backend", local.Dst, local.DstPort, client, 5999)
	sent := udp(inet, 6000, client, 5999, "q").Build() // what the backend got
	p := step("local backend's port unreachable", true, icmpErrorAbout(client, 3, 3, sent), verdictRedirect)
	wantError("local backend's port unreachable", p, 6000, netip.AddrPortFrom(nodeAddr, 30090))
	if got := counted(loader.DirToNetdev); got != 1 {
		t.Fatalf("svc_icmp_error/to-netdev = %d, want 1", got)
	}

	_, remote := h.run(t, h.d.FromNetdev(), udp(inet, 6001, nodeAddr, 30091, "q").Build())
	onWire := parse(t, remote)
	wantAddrPort(t, "translated to the remote backend", onWire.Dst, onWire.DstPort, be1, 5999)
	p = step("remote backend's port unreachable", false, icmpErrorAbout(be1, 3, 3, remote), verdictRedirect)
	wantError("remote backend's port unreachable", p, 6001, netip.AddrPortFrom(nodeAddr, 30091))

	v, syn := h.run(t, h.d.FromNetdev(), tcp(inet, 6002, nodeAddr, 30092, packet.SYN).Build())
	if v != verdictRedirect {
		t.Fatalf("tcp syn to a remote backend: verdict %d", v)
	}
	p = step("router's fragmentation needed", false, icmpErrorAbout(router, 3, 4, syn), verdictRedirect)
	wantError("router's fragmentation needed", p, 6002, netip.AddrPortFrom(nodeAddr, 30092))
	if got := counted(loader.DirFromNetdev); got != 2 {
		t.Fatalf("svc_icmp_error/from-netdev = %d, want 2", got)
	}

	// The node's own UDP socket told its peer is gone: not a service flow.
	own := udp(nodeAddr, 7000, be2, 53, "q").Build()
	in := icmpErrorAbout(be2, 3, 3, own)
	p = step("an error about the node's own flow", false, in, verdictOK)
	if string(p.L4) != string(in[packet.EthLen+20:]) || p.Src != be2 {
		t.Fatal("an error about the node's own flow was changed")
	}
	if got := counted(loader.DirFromNetdev); got != 2 {
		t.Fatalf("svc_icmp_error/from-netdev = %d after the node's own error, want 2", got)
	}
}
