package loader

import (
	"testing"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/internal/testutil"
)

// The sock object reads the pod object's very LB maps and writes its tern_metrics, whatever
// sizes the agent configured; only tern_sock_revnat is its own (pinned).
func TestSockMapsAreThePodObjects(t *testing.T) {
	testutil.RequirePrivileged(t)
	d, err := Load(Config{PinRoot: testPinRoot(t), MaxServices: 1000, MaxBackends: 5000})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	s, err := d.LoadSock()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	id := func(m *ebpf.Map) ebpf.MapID {
		info, err := m.Info()
		if err != nil {
			t.Fatal(err)
		}
		i, _ := info.ID()
		return i
	}
	for name, pm := range map[string]*ebpf.Map{
		SockMapTernServices: d.objs.TernServices, SockMapTernBackends: d.objs.TernBackends,
		SockMapTernLbMembers: d.objs.TernLbMembers, SockMapTernMetrics: d.objs.TernMetrics,
	} {
		sm := s.coll.Maps[name]
		if sm == nil || id(sm) != id(pm) {
			t.Errorf("sock object's %s is not the pod object's map", name)
		}
	}
	pinned, err := ebpf.LoadPinnedMap(d.cfg.PinRoot+"/"+SockMapTernSockRevnat, nil)
	if err != nil {
		t.Fatalf("tern_sock_revnat not pinned: %v", err)
	}
	defer pinned.Close()
	if id(pinned) != id(s.RevNAT()) {
		t.Fatal("the pinned tern_sock_revnat is not the one the programs use")
	}
	// A second load (a restarted agent) reuses the pin.
	s2, err := d.LoadSock()
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if id(s2.RevNAT()) != id(s.RevNAT()) {
		t.Fatal("a second load created a new tern_sock_revnat: translated sockets would lose their frontends")
	}
}
