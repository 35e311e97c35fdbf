package loader_test

import (
	"strings"
	"testing"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// inRange reports whether port lies in r.
func inRange(port uint16, r loader.PortRange) bool { return port >= r.Min && port <= r.Max }

// TestSNATKeepsOffTheNodesEphemeralPorts: masquerade and NodePort SNAT never give a flow a
// port of the node's ephemeral range (its ip_local_port_range), where the node's own
// connections get theirs: a pod's or an external client's own port there is passed over,
// one outside it is kept, and the replies of a moved flow still find it.
func TestSNATKeepsOffTheNodesEphemeralPorts(t *testing.T) {
	linux := loader.PortRange{Min: 32768, Max: 60999}
	for _, c := range []struct {
		name  string
		local loader.PortRange // zero: the loader's default (Linux's)
		node  loader.PortRange // the range the node's sockets use
	}{
		{"Linux's default range", loader.PortRange{}, linux},
		{"a node with 10000-19999", loader.PortRange{Min: 10000, Max: 19999}, loader.PortRange{Min: 10000, Max: 19999}},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newMasq(t, loader.Config{LocalPortRange: c.local})
			moved := 0
			// Every 97th port from 1100 up: inside and outside the node's range.
			for sport := uint16(1100); sport < 65000; sport += 97 {
				p := h.out(t, tcp(client, sport, inet, 443, packet.SYN).Build())
				if inRange(p.SrcPort, c.node) {
					t.Fatalf("pod port %d left as %d, inside the node's ephemeral range %s", sport, p.SrcPort, c.node)
				}
				if p.SrcPort < 1024 {
					t.Fatalf("pod port %d left as %d, below the masquerade range", sport, p.SrcPort)
				}
				if inRange(sport, c.node) {
					moved++
				} else if p.SrcPort != sport {
					t.Fatalf("pod port %d, outside the node's range and free, left as %d; want it kept", sport, p.SrcPort)
				}
				r := h.in(t, tcp(inet, 443, nodeAddr, p.SrcPort, packet.SYN|packet.ACK).Build())
				wantAddrPort(t, "reply", r.Dst, r.DstPort, client, sport)
			}
			if moved < 100 {
				t.Fatalf("only %d ports were inside the node's range; the test should move more", moved)
			}
		})
	}

	t.Run("NodePort SNAT", func(t *testing.T) {
		h := newNP(t)
		h.frontend(t, 1, nodeAddr, 30081, packet.ProtoTCP, uint16(loader.SvcFlagExternal), loadertest.B(be1.String(), 8080))
		for _, cport := range []uint16{40001, 50002, 60999, 32768} {
			_, out := h.run(t, h.d.FromNetdev(), tcp(inet, cport, nodeAddr, 30081, packet.SYN).Build())
			p := parse(t, out)
			if p.Src != nodeAddr || p.Dst != be1 || inRange(p.SrcPort, linux) || p.SrcPort < 1024 {
				t.Fatalf("external client port %d: %s:%d -> %s:%d, want the node's address with a port outside %s",
					cport, p.Src, p.SrcPort, p.Dst, p.DstPort, linux)
			}
			_, back := h.run(t, h.d.FromNetdev(), tcp(be1, 8080, nodeAddr, p.SrcPort, packet.SYN|packet.ACK).Build())
			r := parse(t, back)
			wantAddrPort(t, "NodePort reply", r.Dst, r.DstPort, inet, cport)
		}
	})

	t.Run("a range that leaves too few ports is refused", func(t *testing.T) {
		_, err := loader.Load(loader.Config{PinRoot: t.TempDir(), SNATPortMin: 32768, SNATPortCount: 29000})
		if err == nil || !strings.Contains(err.Error(), "ip_local_port_range") {
			t.Fatalf("Load with a masquerade range of 32768-61767 (768 ports outside it) and the node's 32768-60999: %v; want a refusal naming ip_local_port_range", err)
		}
	})
}
