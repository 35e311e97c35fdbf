package loader_test

import (
	"net/netip"
	"testing"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// The collision that a full table hides (docs/architecture.md, "Collision"): a client's idle
// flow A to frontend f1 lost its REVNAT half to the LRU; the client then reuses A's source
// port towards f2, which lands on the same backend. The new flow B's open finds the wire
// tuple free and takes it unmoved (what the LRU took was the only trace of A there), so the
// backend sees B's SYN on A's tuple. What tern does about it: A's next packet finds B's
// REVNAT half at its tuple, is counted as ct_collision_late and, for TCP, answered with a
// RST from f1 (the backend knows one connection on that tuple, and B's SYN made it B's), so
// A's client fails at once instead of retransmitting into B; A's SYN (a reconnect from the
// same port) or UDP datagram opens a new flow that the collision check now moves to another
// source port. B is left alone throughout.
func TestCollisionAfterTheIdleFlowsReplyHalfWasEvicted(t *testing.T) {
	f1 := netip.MustParseAddr("10.96.0.10")
	f2 := netip.MustParseAddr("10.96.0.20")
	for _, proto := range []uint8{packet.ProtoTCP, packet.ProtoUDP} {
		t.Run(protoName(proto), func(t *testing.T) {
			h := newCT(t, loader.Config{})
			loadertest.PutService(t, h.m, 1, f1.String(), 80, proto, loadertest.B(be1.String(), 8080))
			loadertest.PutService(t, h.m, 2, f2.String(), 80, proto, loadertest.B(be1.String(), 8080))
			late := func() uint64 { return loadertest.Metric(t, h.m, loader.ReasonCTCollisionLate, loader.DirFromPod) }
			portSNAT := func() uint64 { return loadertest.Metric(t, h.m, loader.ReasonSvcPortSNAT, loader.DirFromPod) }

			// A: established, then idle; the LRU takes its REVNAT half.
			h.forward(frame(proto, client, 40000, f1, 80, packet.SYN))
			h.reply(frame(proto, be1, 8080, client, 40000, packet.SYN|packet.ACK))
			h.forward(frame(proto, client, 40000, f1, 80, packet.ACK))
			if err := h.m.CT.Delete(loader.CTFlowKey(client, 40000, be1, 8080, proto)); err != nil {
				t.Fatal(err)
			}

			// B from the same port to f2: the open cannot see A, so B keeps the port.
			out := h.forward(frame(proto, client, 40000, f2, 80, packet.SYN))
			wantAddrPort(t, "B on the wire (the collision is missed)", out.Src, out.SrcPort, client, 40000)
			if got := portSNAT(); got != 0 {
				t.Fatalf("svc_port_snat counted %d: the collision was seen at B's open", got)
			}
			in := h.reply(frame(proto, be1, 8080, client, 40000, packet.SYN|packet.ACK))
			wantAddrPort(t, "B's reply", in.Src, in.SrcPort, f2, 80)

			// A's next packet finds B's half at its tuple.
			if proto == packet.ProtoTCP {
				v, b := loadertest.Run(t, h.d.FromPod(), tcp(client, 40000, f1, 80, packet.ACK|packet.PSH).Build())
				if v != verdictRedirect {
					t.Fatalf("A's segment after B took its tuple: verdict %d, want a RST sent back (redirect %d)", v, verdictRedirect)
				}
				rst := parse(t, b)
				wantAddrPort(t, "the RST's source", rst.Src, rst.SrcPort, f1, 80)
				wantAddrPort(t, "the RST's destination", rst.Dst, rst.DstPort, client, 40000)
				if rst.TCPFlags&packet.RST == 0 {
					t.Fatalf("A's segment was answered with flags %#x, want a RST", rst.TCPFlags)
				}
				if got := late(); got != 1 {
					t.Fatalf("ct_collision_late counted %d, want 1", got)
				}
				// A reconnect from the same port to f1 (a SYN) is a new flow: moved.
				out = h.forward(frame(proto, client, 40000, f1, 80, packet.SYN))
			} else {
				out = h.forward(frame(proto, client, 40000, f1, 80, 0))
			}
			if out.SrcPort < 61000 || out.Dst != be1 {
				t.Fatalf("A's new flow on the wire %s:%d -> %s:%d, want moved to a port from the collision range", out.Src, out.SrcPort, out.Dst, out.DstPort)
			}
			if got := portSNAT(); got != 1 {
				t.Fatalf("svc_port_snat counted %d for A's new flow, want 1", got)
			}
			// Counted once more (TCP: the RST'd segment was the first).
			if want := map[uint8]uint64{packet.ProtoTCP: 2, packet.ProtoUDP: 1}[proto]; late() != want {
				t.Fatalf("ct_collision_late counted %d after A's new flow, want %d", late(), want)
			}
			// Both flows answer from their own frontend, B's untouched.
			ra := h.reply(frame(proto, be1, 8080, client, out.SrcPort, packet.ACK))
			wantAddrPort(t, "A's reply source", ra.Src, ra.SrcPort, f1, 80)
			wantAddrPort(t, "A's reply destination", ra.Dst, ra.DstPort, client, 40000)
			rb := h.reply(frame(proto, be1, 8080, client, 40000, packet.ACK))
			wantAddrPort(t, "B's reply source", rb.Src, rb.SrcPort, f2, 80)
			ob := h.forward(frame(proto, client, 40000, f2, 80, packet.ACK))
			wantAddrPort(t, "B's next packet", ob.Src, ob.SrcPort, client, 40000)
		})
	}
}
