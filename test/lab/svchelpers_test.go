//go:build linux

package lab_test

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/ternctl"
	"github.com/tern-net/tern/test/lab"
)

// waitBackends waits until node n's agent has programmed frontend/proto with exactly the
// backends want (in any order), read from the node's pinned service map: the condition a
// client needs before every connect must succeed. It fails the test after 30 s, naming what
// the map held.
func waitBackends(t testing.TB, n *lab.Node, frontend netip.AddrPort, proto string, want ...netip.AddrPort) {
	t.Helper()
	want = slices.SortedFunc(slices.Values(want), netip.AddrPort.Compare)
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err := frontendBackends(n, frontend, proto)
		if err != nil {
			t.Fatalf("read the pinned service map of %s: %v", n.Name, err)
		}
		if slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 30s %s's service map has %s/%s with backends %v, want %v", n.Name, frontend, proto, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// frontendBackends returns the sorted backends of frontend/proto in n's pinned service map
// (nil when the frontend is absent).
func frontendBackends(n *lab.Node, frontend netip.AddrPort, proto string) ([]netip.AddrPort, error) {
	svcs, err := ternctl.ReadServicesAt(n.PinRoot())
	if err != nil {
		return nil, err
	}
	for _, s := range svcs {
		if s.Frontend == frontend && s.Proto == proto {
			return slices.SortedFunc(slices.Values(s.BackendAddrs()), netip.AddrPort.Compare), nil
		}
	}
	return nil, nil
}

// serveWho answers every connection to port in pod p with "<pod name> <client address>",
// the address the backend saw, and closes it.
func serveWho(t *testing.T, p *lab.Pod, port int) {
	t.Helper()
	testutil.ServeConns(t, p.NS(), fmt.Sprintf(":%d", port), func(c net.Conn) {
		fmt.Fprintf(c, "%s %s\n", p.Name, c.RemoteAddr())
		c.Close()
	})
}

// serveWhoUDP answers every datagram to port in pod p with "<pod name> <client address>".
func serveWhoUDP(t *testing.T, p *lab.Pod, port int) {
	t.Helper()
	var c net.PacketConn
	if err := p.Exec(func() (err error) {
		c, err = net.ListenPacket("udp4", fmt.Sprintf(":%d", port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { c.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			_, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = c.WriteTo([]byte(fmt.Sprintf("%s %s\n", p.Name, from)), from)
		}
	}()
}
