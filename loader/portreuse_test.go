package loader_test

import (
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// A client closes a service flow with a RST (SO_LINGER 0, so its port is free at once) and
// connects from the same source port straight to the backend the flow used: the direct
// flow's tuple is the old flow's translated one, whose REVNAT half is still within its
// lifetime. The direct SYN ends the old flow (both halves), so the backend's SYN-ACK reaches
// the client from the backend, not reverse-translated to the frontend (which the client
// drops: the connection timed out). A late packet of the old flow must not take the tuple
// back. For UDP (no SYN to tell a new flow) any client packet sent straight to the backend
// ends the old flow; the service flow's next packet opens a new one on another wire port,
// and both get their replies from the right address. A TCP service flow still open when the
// direct SYN comes (Linux may share an ephemeral port between destinations) ends the same way.
func TestDirectFlowReusesAClosedServiceFlowsPort(t *testing.T) {
	for _, tc := range []struct {
		name  string
		proto uint8
		rst   bool
	}{{"tcp after RST", packet.ProtoTCP, true}, {"tcp without close", packet.ProtoTCP, false}, {"udp", packet.ProtoUDP, false}} {
		proto := tc.proto
		t.Run(tc.name, func(t *testing.T) {
			h := newCT(t, loader.Config{})
			loadertest.PutService(t, h.m, 1, vip.String(), 80, proto, loadertest.B(be1.String(), 8080))

			// The service flow: handshake, data, then the client's RST.
			out := h.forward(frame(proto, client, 40000, vip, 80, packet.SYN))
			wantAddrPort(t, "service flow on the wire", out.Dst, out.DstPort, be1, 8080)
			in := h.reply(frame(proto, be1, 8080, client, 40000, packet.SYN|packet.ACK))
			wantAddrPort(t, "service flow's reply", in.Src, in.SrcPort, vip, 80)
			h.forward(frame(proto, client, 40000, vip, 80, packet.ACK))
			h.forward(frame(proto, client, 40000, vip, 80, packet.PSH|packet.ACK))
			h.reply(frame(proto, be1, 8080, client, 40000, packet.PSH|packet.ACK))
			if tc.rst {
				h.forward(frame(proto, client, 40000, vip, 80, packet.RST))
				// The RST shortens both halves to the closing lifetime (10 s by default).
				var ts unix.Timespec
				if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
					t.Fatal(err)
				}
				for _, k := range []loader.CTKey{loader.CTFlowKey(client, 40000, vip, 80, proto), loader.CTFlowKey(client, 40000, be1, 8080, proto)} {
					var v loader.CTValue
					if err := h.m.CT.Lookup(k, &v); err != nil {
						t.Fatal(err)
					}
					if v.Flags&loader.CTFlagClosing == 0 || v.ExpiresNs > uint64(ts.Nano())+11e9 {
						t.Errorf("after the RST the half at %+v is %+v, want closing within 10 s", k, v)
					}
				}
			}

			// The same port, straight to the backend.
			out = h.forward(frame(proto, client, 40000, be1, 8080, packet.SYN))
			wantAddrPort(t, "direct flow's first packet, source", out.Src, out.SrcPort, client, 40000)
			wantAddrPort(t, "direct flow's first packet, destination", out.Dst, out.DstPort, be1, 8080)
			in = h.reply(frame(proto, be1, 8080, client, 40000, packet.SYN|packet.ACK))
			wantAddrPort(t, "direct flow's reply source", in.Src, in.SrcPort, be1, 8080)
			wantAddrPort(t, "direct flow's reply destination", in.Dst, in.DstPort, client, 40000)
			h.forward(frame(proto, client, 40000, be1, 8080, packet.ACK))

			svcKey := loader.CTFlowKey(client, 40000, vip, 80, proto)
			var svc loader.CTValue
			if err := h.m.CT.Lookup(svcKey, &svc); err == nil {
				t.Errorf("the ended service flow's SVC half is still there: %+v", svc)
			}
			var direct loader.CTValue
			if err := h.m.CT.Lookup(loader.CTFlowKey(client, 40000, be1, 8080, proto), &direct); err != nil {
				t.Fatalf("the direct flow has no entry: %v", err)
			}
			if direct.Flags&(loader.CTFlagRevNAT|loader.CTFlagSvc) != 0 {
				t.Errorf("the direct flow's entry is a service flow's half: %+v", direct)
			}

			// A late packet of the old flow (TCP: its RST again; UDP: the socket asking the
			// Service again) takes another wire port and leaves the direct flow alone.
			late := h.forward(frame(proto, client, 40000, vip, 80, packet.RST))
			if late.Dst != be1 || late.SrcPort == 40000 {
				t.Errorf("the old flow's late packet went out as %s:%d -> %s:%d, want another source port than the direct flow's",
					late.Src, late.SrcPort, late.Dst, late.DstPort)
			}
			in = h.reply(frame(proto, be1, 8080, client, 40000, packet.PSH|packet.ACK))
			wantAddrPort(t, "direct flow's data after the old flow's late packet", in.Src, in.SrcPort, be1, 8080)
			if proto == packet.ProtoUDP {
				in = h.reply(frame(proto, be1, 8080, client, late.SrcPort, 0))
				wantAddrPort(t, "the Service's reply on its new wire port", in.Src, in.SrcPort, vip, 80)
				wantAddrPort(t, "the Service's reply destination", in.Dst, in.DstPort, client, 40000)
			}
		})
	}
}
