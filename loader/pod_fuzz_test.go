package loader_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// FuzzPodPrograms runs random and mutated frames through the real pod programs with
// BPF_PROG_TEST_RUN (one datapath per fuzz worker, with a TCP, a UDP and an SCTP service and
// one without endpoints) and checks, for every frame:
//   - the verdict is one the program may give, and replaying the frame gives the same verdict
//     and the same output (the first run's conntrack entry must lead to the same translation);
//   - a frame the program changed and still forwards was a well-formed IPv4 packet (per
//     internal/packet, an independent parser): a malformed packet is never translated;
//   - a translated packet whose checksums were right still has right IPv4 and L4 checksums,
//     verified in Go.
//
// dir picks the program: even from the pod, odd to the pod.
func FuzzPodPrograms(f *testing.F) {
	rejectVIP := netip.MustParseAddr("10.96.0.99")
	seeds := []packet.Frame{
		tcp(client, 40000, vip, 80, packet.SYN),
		tcp(client, 40001, vip, 80, packet.ACK),
		tcp(client, 40002, rejectVIP, 80, packet.SYN),
		tcp(be1, 8080, client, 40000, packet.SYN|packet.ACK),
		udp(client, 40000, vip, 53, "query"),
		udp(be2, 5353, client, 40000, "answer"),
		udp(client, 40003, rejectVIP, 53, "q"),
		{SrcMAC: podMAC, DstMAC: hostMAC, Src: client, Dst: vip, Proto: packet.ProtoSCTP, SrcPort: 5000, DstPort: 9, Payload: make([]byte, 8)},
		{SrcMAC: podMAC, DstMAC: hostMAC, Src: client, Dst: vip, Proto: packet.ProtoICMP, ICMPType: 8, Payload: []byte("ping")},
		{SrcMAC: podMAC, DstMAC: hostMAC, Src: client, Dst: vip, Proto: packet.ProtoUDP, ID: 77, MoreFragments: true,
			L4Raw: append([]byte{0x9c, 0x40, 0, 53, 0, 32, 0, 0}, make([]byte, 16)...)},
		{SrcMAC: podMAC, DstMAC: hostMAC, Src: client, Dst: vip, Proto: packet.ProtoUDP, ID: 77, FragOffset: 3, L4Raw: make([]byte, 16)},
	}
	withOpts := tcp(client, 40004, vip, 80, packet.SYN)
	withOpts.Options = []byte{1, 1, 1, 0}
	seeds = append(seeds, withOpts)
	for i, s := range seeds {
		f.Add(uint8(i%2), s.Build())
		f.Add(uint8(1-i%2), s.Build())
	}
	// An ICMP port unreachable about the UDP seed's translated packet, into the client
	// (svcicmp.h; the seeds run in order, so the flow it quotes is open by then).
	f.Add(uint8(1), icmpErrorAbout(be2, 3, 3, udp(client, 40000, be2, 5353, "query").Build()))

	d := loadertest.New(f, loader.Config{})
	m := d.Maps()
	loadertest.PutService(f, m, 1, vip.String(), 80, packet.ProtoTCP, loadertest.B(be1.String(), 8080), loadertest.B(be2.String(), 8081))
	loadertest.PutService(f, m, 2, vip.String(), 53, packet.ProtoUDP, loadertest.B(be2.String(), 5353))
	loadertest.PutService(f, m, 3, vip.String(), 9, packet.ProtoSCTP, loadertest.B(be1.String(), 9))
	loadertest.PutService(f, m, 4, rejectVIP.String(), 80, packet.ProtoTCP)
	loadertest.PutService(f, m, 5, rejectVIP.String(), 53, packet.ProtoUDP)

	f.Fuzz(func(t *testing.T, dir uint8, frame []byte) {
		prog := d.FromPod()
		if dir%2 == 1 {
			prog = d.ToPod()
		}
		v1, out1, ok := runFrame(t, prog, frame)
		if !ok {
			return
		}
		v2, out2, _ := runFrame(t, prog, frame)
		if v1 != v2 || !bytes.Equal(out1, out2) {
			t.Fatalf("replay differs: verdict %d then %d\nfirst  %x\nsecond %x", v1, v2, out1, out2)
		}
		switch v1 {
		case verdictOK, verdictShot, verdictRedirect:
		default:
			t.Fatalf("verdict %d is none of TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT", v1)
		}
		if v1 == verdictShot || bytes.Equal(frame, out1) {
			return
		}
		in, err := packet.Parse(frame)
		if err != nil || !wellFormed(frame) {
			t.Fatalf("malformed frame (%v) was changed and forwarded (verdict %d)\nin  %x\nout %x", err, v1, frame, out1)
		}
		got, err := packet.Parse(out1)
		if err != nil {
			t.Fatalf("forwarded output does not parse: %v\nin  %x\nout %x", err, frame, out1)
		}
		if in.ChecksumsOK() && !got.ChecksumsOK() {
			t.Fatalf("checksums broken by the translation: ip %v l4 %v\nin  %x\nout %x", got.IPChecksumOK, got.L4ChecksumOK, frame, out1)
		}
	})
}

// wellFormed adds to packet.Parse what the stack would check later: the IPv4 version, the
// TCP data offset within the packet.
func wellFormed(b []byte) bool {
	ip := b[packet.EthLen:]
	if ip[0]>>4 != 4 {
		return false
	}
	ihl := int(ip[0]&0x0f) * 4
	tot := int(binary.BigEndian.Uint16(ip[2:]))
	frag := binary.BigEndian.Uint16(ip[6:])
	if ip[9] == packet.ProtoTCP && frag&0x1fff == 0 {
		off := int(ip[ihl+12]>>4) * 4
		return off >= 20 && ihl+off <= tot
	}
	return true
}

// maxFuzzFrame is an Ethernet frame at MTU 1500. BPF_PROG_TEST_RUN refuses frames that do
// not fit one page with the skb's head and tail room (~3.8 KiB), which says nothing about
// the program.
const maxFuzzFrame = 1514

// runFrame runs prog once; ok is false when the kernel refuses the frame itself (too short for
// an skb, or longer than an MTU-sized frame), which says nothing about the program.
func runFrame(t *testing.T, prog *ebpf.Program, frame []byte) (uint32, []byte, bool) {
	if len(frame) > maxFuzzFrame {
		return 0, nil, false
	}
	opts := &ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+256)}
	ret, err := prog.Run(opts)
	if errors.Is(err, unix.EINVAL) && len(frame) < packet.EthLen+20 {
		return 0, nil, false
	}
	if err != nil {
		t.Fatalf("test run of %d bytes: %v", len(frame), err)
	}
	return ret, opts.DataOut, true
}
