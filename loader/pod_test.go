package loader_test

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

const (
	verdictOK       = 0
	verdictShot     = 2
	verdictRedirect = 7
)

var (
	podMAC  = [6]byte{0x02, 0, 0, 0, 0, 1}
	hostMAC = [6]byte{0x02, 0, 0, 0, 0, 2}
	client  = netip.MustParseAddr("10.0.1.10")
	vip     = netip.MustParseAddr("10.96.0.10")
	be1     = netip.MustParseAddr("10.0.2.21")
	be2     = netip.MustParseAddr("10.0.2.22")
)

func tcp(src netip.Addr, sport uint16, dst netip.Addr, dport uint16, flags uint8) packet.Frame {
	return packet.Frame{SrcMAC: podMAC, DstMAC: hostMAC, Src: src, Dst: dst, Proto: packet.ProtoTCP,
		SrcPort: sport, DstPort: dport, Seq: 1000, TCPFlags: flags, ID: 7}
}

func udp(src netip.Addr, sport uint16, dst netip.Addr, dport uint16, payload string) packet.Frame {
	return packet.Frame{SrcMAC: podMAC, DstMAC: hostMAC, Src: src, Dst: dst, Proto: packet.ProtoUDP,
		SrcPort: sport, DstPort: dport, Payload: []byte(payload), ID: 9}
}

func parse(t *testing.T, b []byte) packet.Parsed {
	t.Helper()
	p, err := packet.Parse(b)
	if err != nil {
		t.Fatalf("parse output: %v", err)
	}
	if !p.ChecksumsOK() {
		t.Fatalf("bad checksums in output: ip %v l4 %v", p.IPChecksumOK, p.L4ChecksumOK)
	}
	return p
}

func wantAddrPort(t *testing.T, what string, gotA netip.Addr, gotP uint16, wantA netip.Addr, wantP uint16) {
	t.Helper()
	if gotA != wantA || gotP != wantP {
		t.Fatalf("%s = %s:%d, want %s:%d", what, gotA, gotP, wantA, wantP)
	}
}

func TestServiceDNATAndReverseNAT(t *testing.T) {
	for _, proto := range []uint8{packet.ProtoTCP, packet.ProtoUDP} {
		t.Run(map[uint8]string{packet.ProtoTCP: "tcp", packet.ProtoUDP: "udp"}[proto], func(t *testing.T) {
			d := loadertest.New(t, loader.Config{})
			m := d.Maps()
			loadertest.PutService(t, m, 1, vip.String(), 80, proto, loadertest.B(be1.String(), 8080))

			var fwd packet.Frame
			if proto == packet.ProtoTCP {
				fwd = tcp(client, 40000, vip, 80, packet.SYN)
			} else {
				fwd = udp(client, 40000, vip, 80, "hello")
			}
			v, out := loadertest.Run(t, d.FromPod(), fwd.Build())
			if v != verdictOK {
				t.Fatalf("verdict %d, want TC_ACT_OK", v)
			}
			p := parse(t, out)
			wantAddrPort(t, "DNAT destination", p.Dst, p.DstPort, be1, 8080)
			wantAddrPort(t, "DNAT source", p.Src, p.SrcPort, client, 40000)

			// The backend's reply, on its way into the client pod.
			var rep packet.Frame
			if proto == packet.ProtoTCP {
				rep = tcp(be1, 8080, client, 40000, packet.SYN|packet.ACK)
			} else {
				rep = udp(be1, 8080, client, 40000, "world")
			}
			v, out = loadertest.Run(t, d.ToPod(), rep.Build())
			if v != verdictOK {
				t.Fatalf("reply verdict %d", v)
			}
			p = parse(t, out)
			wantAddrPort(t, "reverse NAT source", p.Src, p.SrcPort, vip, 80)
			wantAddrPort(t, "reverse NAT destination", p.Dst, p.DstPort, client, 40000)

			ct, err := m.DumpCT()
			if err != nil {
				t.Fatal(err)
			}
			// The client's tuple and the translated one.
			kinds := map[string]int{}
			for _, v := range ct {
				switch {
				case v.Flags&loader.CTFlagSvc != 0:
					kinds["svc"]++
				case v.Flags&loader.CTFlagRevNAT != 0:
					kinds["revnat"]++
				}
			}
			if len(ct) != 2 || kinds["svc"] != 1 || kinds["revnat"] != 1 {
				t.Fatalf("conntrack holds %v, want the client's tuple and the translated one", kinds)
			}
			for _, e := range ct {
				if e.Flags&loader.CTFlagSeenReply == 0 {
					t.Fatalf("conntrack entry not marked as replied: %+v", e)
				}
			}
			if got := loadertest.Metric(t, m, loader.ReasonSvcForward, loader.DirFromPod); got != 1 {
				t.Fatalf("svc_forward counted %d, want 1", got)
			}
			if got := loadertest.Metric(t, m, loader.ReasonSvcRevNAT, loader.DirToPod); got != 1 {
				t.Fatalf("svc_revnat counted %d, want 1", got)
			}
		})
	}
}

func TestFlowsStickToTheirBackend(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	loadertest.PutService(t, m, 1, vip.String(), 80, packet.ProtoTCP, loadertest.B(be1.String(), 8080), loadertest.B(be2.String(), 8080))

	seen := map[netip.Addr]int{}
	for port := uint16(30000); port < 30200; port++ {
		_, out := loadertest.Run(t, d.FromPod(), tcp(client, port, vip, 80, packet.SYN).Build())
		first := parse(t, out).Dst
		seen[first]++
		for i := 0; i < 5; i++ {
			_, out := loadertest.Run(t, d.FromPod(), tcp(client, port, vip, 80, packet.ACK).Build())
			if got := parse(t, out).Dst; got != first {
				t.Fatalf("flow from port %d moved from %s to %s", port, first, got)
			}
		}
	}
	// 200 flows over 2 backends: a uniform choice gives each well over 50 (p < 1e-12 to fail).
	if seen[be1] < 50 || seen[be2] < 50 {
		t.Fatalf("backend choice not spread: %v", seen)
	}
}

func TestNonServiceTrafficUntouched(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	loadertest.PutService(t, d.Maps(), 1, vip.String(), 80, packet.ProtoTCP, loadertest.B(be1.String(), 8080))

	arp := make([]byte, 42)
	copy(arp[12:], []byte{0x08, 0x06})
	cases := map[string][]byte{
		"tcp to another address":     tcp(client, 1234, be2, 80, packet.SYN).Build(),
		"tcp to the vip, other port": tcp(client, 1234, vip, 81, packet.SYN).Build(),
		"udp to the vip's tcp port":  udp(client, 1234, vip, 80, "x").Build(),
		"icmp echo to the vip": packet.Frame{SrcMAC: podMAC, DstMAC: hostMAC, Src: client, Dst: vip,
			Proto: packet.ProtoICMP, ICMPType: 8}.Build(),
		"arp": arp,
	}
	for name, in := range cases {
		for _, prog := range []struct {
			name string
			run  func() (uint32, []byte)
		}{
			{"from-pod", func() (uint32, []byte) { return loadertest.Run(t, d.FromPod(), in) }},
			{"to-pod", func() (uint32, []byte) { return loadertest.Run(t, d.ToPod(), in) }},
		} {
			v, out := prog.run()
			if v != verdictOK || !bytes.Equal(out, in) {
				t.Errorf("%s via %s: verdict %d, changed %v", name, prog.name, v, !bytes.Equal(out, in))
			}
		}
	}
}

func TestNoEndpointsRejects(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	loadertest.PutService(t, m, 1, vip.String(), 80, packet.ProtoTCP)
	loadertest.PutService(t, m, 2, vip.String(), 53, packet.ProtoUDP)

	t.Run("tcp syn gets rst", func(t *testing.T) {
		v, out := loadertest.Run(t, d.FromPod(), tcp(client, 40000, vip, 80, packet.SYN).Build())
		if v != verdictRedirect {
			t.Fatalf("verdict %d, want redirect back to the pod", v)
		}
		p := parse(t, out)
		wantAddrPort(t, "rst source", p.Src, p.SrcPort, vip, 80)
		wantAddrPort(t, "rst destination", p.Dst, p.DstPort, client, 40000)
		if p.TCPFlags != packet.RST|packet.ACK || p.Ack != 1001 || p.Seq != 0 {
			t.Fatalf("rst flags %#x seq %d ack %d, want RST|ACK seq 0 ack 1001", p.TCPFlags, p.Seq, p.Ack)
		}
		if p.DstMAC != podMAC || p.SrcMAC != hostMAC {
			t.Fatalf("rst MACs not swapped: %x -> %x", p.SrcMAC, p.DstMAC)
		}
	})
	t.Run("tcp ack gets rst with its ack as seq", func(t *testing.T) {
		f := tcp(client, 40001, vip, 80, packet.ACK)
		f.Ack = 777
		f.Payload = []byte("data")
		v, out := loadertest.Run(t, d.FromPod(), f.Build())
		p := parse(t, out)
		if v != verdictRedirect || p.TCPFlags != packet.RST || p.Seq != 777 {
			t.Fatalf("verdict %d flags %#x seq %d, want RST seq 777", v, p.TCPFlags, p.Seq)
		}
	})
	t.Run("udp gets icmp port unreachable", func(t *testing.T) {
		in := udp(client, 5353, vip, 53, "query")
		v, out := loadertest.Run(t, d.FromPod(), in.Build())
		if v != verdictRedirect {
			t.Fatalf("verdict %d, want redirect", v)
		}
		p := parse(t, out)
		if p.Proto != packet.ProtoICMP || p.ICMPType != 3 || p.ICMPCode != 3 || p.Src != vip || p.Dst != client {
			t.Fatalf("got proto %d type %d code %d %s -> %s", p.Proto, p.ICMPType, p.ICMPCode, p.Src, p.Dst)
		}
		quoted := in.Build()[packet.EthLen : packet.EthLen+28]
		if !bytes.Equal(p.L4[8:36], quoted) {
			t.Fatalf("icmp does not quote the client's header:\n got %x\nwant %x", p.L4[8:36], quoted)
		}
	})
	if got := loadertest.Metric(t, m, loader.ReasonSvcReject, loader.DirFromPod); got != 3 {
		t.Fatalf("svc_reject counted %d, want 3", got)
	}
	ct, _ := m.DumpCT()
	if len(ct) != 0 {
		t.Fatalf("rejected flows left %d conntrack entries", len(ct))
	}
}

func TestMalformedPacketsDroppedWithReason(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	loadertest.PutService(t, m, 1, vip.String(), 80, packet.ProtoTCP, loadertest.B(be1.String(), 8080))
	good := tcp(client, 40000, vip, 80, packet.SYN).Build()

	badIHL := append([]byte(nil), good...)
	badIHL[packet.EthLen] = 0x44
	// BPF_PROG_TEST_RUN refuses frames shorter than an IPv4 header, so truncation is tested
	// where parsing goes past it: options the frame does not hold, and the TCP header.
	optionsCut := append([]byte(nil), good[:packet.EthLen+20]...)
	optionsCut[packet.EthLen] = 0x4f
	shortTotal := append([]byte(nil), good...)
	shortTotal[packet.EthLen+2], shortTotal[packet.EthLen+3] = 0, 10
	// Found by FuzzPodPrograms: a total length beyond the frame, or one that ends inside
	// the TCP header (the rest is padding), was translated and forwarded.
	longTotal := append([]byte(nil), good...)
	longTotal[packet.EthLen+2], longTotal[packet.EthLen+3] = 0x30, 0x30
	totalCutsTCP := append(append([]byte(nil), good...), make([]byte, 20)...)
	totalCutsTCP[packet.EthLen+2], totalCutsTCP[packet.EthLen+3] = 0, 20+8
	badDoff := append([]byte(nil), good...)
	badDoff[packet.EthLen+20+12] = 0x40

	cases := []struct {
		name   string
		in     []byte
		reason loader.Reason
	}{
		{"ipv4 options cut short", optionsCut, loader.ReasonDropTruncated},
		{"tcp header cut short", good[:packet.EthLen+20+8], loader.ReasonDropTruncated},
		{"ihl below 5", badIHL, loader.ReasonDropBadIP},
		{"total length below header", shortTotal, loader.ReasonDropBadIP},
		{"total length beyond the frame", longTotal, loader.ReasonDropTruncated},
		{"total length ends inside the tcp header", totalCutsTCP, loader.ReasonDropTruncated},
		{"tcp data offset below 5", badDoff, loader.ReasonDropBadIP},
	}
	for _, c := range cases {
		before := loadertest.Metric(t, m, c.reason, loader.DirFromPod)
		v, _ := loadertest.Run(t, d.FromPod(), c.in)
		if v != verdictShot {
			t.Errorf("%s: verdict %d, want drop", c.name, v)
		}
		if loadertest.Metric(t, m, c.reason, loader.DirFromPod) != before+1 {
			t.Errorf("%s: drop not counted under %s", c.name, c.reason)
		}
	}
}

func TestIPOptionsAndZeroUDPChecksum(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	loadertest.PutService(t, m, 1, vip.String(), 80, packet.ProtoTCP, loadertest.B(be1.String(), 8080))
	loadertest.PutService(t, m, 2, vip.String(), 53, packet.ProtoUDP, loadertest.B(be2.String(), 5353))

	f := tcp(client, 40000, vip, 80, packet.SYN)
	f.Options = []byte{1, 1, 1, 0} // NOP NOP NOP EOL
	_, out := loadertest.Run(t, d.FromPod(), f.Build())
	p := parse(t, out)
	if p.IHL != 24 {
		t.Fatalf("ihl %d, want options kept", p.IHL)
	}
	wantAddrPort(t, "dnat with options", p.Dst, p.DstPort, be1, 8080)

	u := udp(client, 40000, vip, 53, "q")
	u.NoUDPChecksum = true
	_, out = loadertest.Run(t, d.FromPod(), u.Build())
	p = parse(t, out)
	wantAddrPort(t, "dnat without udp checksum", p.Dst, p.DstPort, be2, 5353)
	if !p.UDPChecksumZero {
		t.Fatal("a zero UDP checksum must stay zero")
	}
}

func TestFragments(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	loadertest.PutService(t, m, 1, vip.String(), 53, packet.ProtoUDP, loadertest.B(be1.String(), 5353))

	// A UDP datagram of 8+24 bytes split in two: header and 16 bytes, then 16 bytes.
	payload := bytes.Repeat([]byte{0xab}, 24)
	whole := udp(client, 40000, vip, 53, string(payload)).Build()
	l4 := whole[packet.EthLen+20:]
	head := packet.Frame{SrcMAC: podMAC, DstMAC: hostMAC, Src: client, Dst: vip, Proto: packet.ProtoUDP,
		ID: 99, MoreFragments: true, L4Raw: l4[:16]}
	tail := packet.Frame{SrcMAC: podMAC, DstMAC: hostMAC, Src: client, Dst: vip, Proto: packet.ProtoUDP,
		ID: 99, FragOffset: 2, L4Raw: l4[16:]}

	_, out := loadertest.Run(t, d.FromPod(), head.Build())
	ph, _ := packet.Parse(out)
	wantAddrPort(t, "first fragment", ph.Dst, ph.DstPort, be1, 5353)
	v, out := loadertest.Run(t, d.FromPod(), tail.Build())
	pt, _ := packet.Parse(out)
	if v != verdictOK || pt.Dst != be1 || !pt.IPChecksumOK {
		t.Fatalf("second fragment: verdict %d dst %s ip csum %v", v, pt.Dst, pt.IPChecksumOK)
	}
	// Reassemble and check the UDP checksum over the whole datagram.
	re := packet.Frame{SrcMAC: podMAC, DstMAC: hostMAC, Src: client, Dst: be1, Proto: packet.ProtoUDP,
		L4Raw: append(append([]byte(nil), ph.L4...), pt.L4...)}
	if p, err := packet.Parse(re.Build()); err != nil || !p.L4ChecksumOK || p.DstPort != 5353 {
		t.Fatalf("reassembled datagram: %v checksum ok %v port %d", err, p.L4ChecksumOK, p.DstPort)
	}

	// A later fragment whose head was not translated here passes untouched: it is either
	// not service traffic or addressed to a VIP nothing routes.
	orphan := tail
	orphan.ID = 100
	if v, out := loadertest.Run(t, d.FromPod(), orphan.Build()); v != verdictOK || !bytes.Equal(out[:len(orphan.Build())], orphan.Build()) {
		t.Fatalf("fragment without a translated head: verdict %d, want it passed untouched", v)
	}
}

// A fragmented datagram that is not service traffic passes, head and tail, in both
// programs, and leaves nothing in the fragment map (so such traffic can never evict the
// heads of service datagrams).
func TestNonServiceFragmentsPass(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	loadertest.PutService(t, m, 1, vip.String(), 53, packet.ProtoUDP, loadertest.B(be1.String(), 5353))
	other := netip.MustParseAddr("10.0.3.30")
	payload := bytes.Repeat([]byte{0xcd}, 24)
	l4 := udp(client, 40000, other, 53, string(payload)).Build()[packet.EthLen+20:]
	head := packet.Frame{SrcMAC: podMAC, DstMAC: hostMAC, Src: client, Dst: other, Proto: packet.ProtoUDP,
		ID: 77, MoreFragments: true, L4Raw: l4[:16]}
	tail := packet.Frame{SrcMAC: podMAC, DstMAC: hostMAC, Src: client, Dst: other, Proto: packet.ProtoUDP,
		ID: 77, FragOffset: 2, L4Raw: l4[16:]}
	for _, prog := range []struct {
		name string
		run  func([]byte) (uint32, []byte)
	}{
		{"from-pod", func(b []byte) (uint32, []byte) { return loadertest.Run(t, d.FromPod(), b) }},
		{"to-pod", func(b []byte) (uint32, []byte) { return loadertest.Run(t, d.ToPod(), b) }},
	} {
		for _, f := range []packet.Frame{head, tail} {
			in := f.Build()
			v, out := prog.run(in)
			if v != verdictOK || !bytes.Equal(out[:len(in)], in) {
				t.Fatalf("%s: fragment at offset %d: verdict %d, want it passed untouched", prog.name, f.FragOffset, v)
			}
		}
	}
	var (
		k  loader.PodFragKey
		fv loader.PodFragValue
	)
	if d.Maps() != nil {
		frags := d.FragsForTest()
		if frags.Iterate().Next(&k, &fv) {
			t.Fatalf("a non-service datagram left a fragment entry: %+v", k)
		}
	}
}

func TestHairpin(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	hairpin := d.Config().HairpinIP
	loadertest.PutService(t, d.Maps(), 1, vip.String(), 80, packet.ProtoTCP, loadertest.B(client.String(), 8080))

	v, out := loadertest.Run(t, d.FromPod(), tcp(client, 40000, vip, 80, packet.SYN).Build())
	if v != verdictRedirect {
		t.Fatalf("verdict %d, want redirect back into the pod", v)
	}
	p := parse(t, out)
	wantAddrPort(t, "hairpin destination", p.Dst, p.DstPort, client, 8080)
	wantAddrPort(t, "hairpin source", p.Src, p.SrcPort, hairpin, 40000)

	// The pod answers the hairpin address; from-pod turns it back into VIP -> client.
	v, out = loadertest.Run(t, d.FromPod(), tcp(client, 8080, hairpin, 40000, packet.SYN|packet.ACK).Build())
	if v != verdictRedirect {
		t.Fatalf("reply verdict %d, want redirect", v)
	}
	p = parse(t, out)
	wantAddrPort(t, "hairpin reply source", p.Src, p.SrcPort, vip, 80)
	wantAddrPort(t, "hairpin reply destination", p.Dst, p.DstPort, client, 40000)
}

func TestSCTP(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	loadertest.PutService(t, m, 1, vip.String(), 9000, packet.ProtoSCTP, loadertest.B(be1.String(), 9000))
	loadertest.PutService(t, m, 2, vip.String(), 9001, packet.ProtoSCTP, loadertest.B(be1.String(), 9999))
	sctp := func(dport uint16) []byte {
		return packet.Frame{SrcMAC: podMAC, DstMAC: hostMAC, Src: client, Dst: vip, Proto: packet.ProtoSCTP,
			SrcPort: 5000, DstPort: dport}.Build()
	}
	v, out := loadertest.Run(t, d.FromPod(), sctp(9000))
	p, _ := packet.Parse(out)
	if v != verdictOK || p.Dst != be1 || p.DstPort != 9000 || !p.IPChecksumOK {
		t.Fatalf("sctp same-port dnat: verdict %d dst %s:%d", v, p.Dst, p.DstPort)
	}
	if v, _ := loadertest.Run(t, d.FromPod(), sctp(9001)); v != verdictShot {
		t.Fatalf("sctp port translation: verdict %d, want drop (CRC32c cannot be patched)", v)
	}
}
