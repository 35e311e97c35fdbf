//go:build linux

package lab_test

import (
	"net/netip"
	"slices"
	"testing"
	"time"

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
