package lbmap

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
)

// mapState decodes the kernel maps back into a State, independently of the reconciler's
// mirror, and checks that the membership index holds exactly the backends in slots.
func mapState(t *testing.T, m *loader.Maps) service.State {
	t.Helper()
	svcs, err := m.DumpServices()
	if err != nil {
		t.Fatal(err)
	}
	bes, _ := m.DumpBackends()
	mem, _ := m.DumpMembers()
	out := service.State{}
	want := map[loader.MemberKey]bool{}
	for k, v := range svcs {
		f := service.Frontend{Addr: loader.BEToAddr(k.Addr), Port: loader.BEToPort(k.Port), Proto: service.Protocol(k.Proto)}
		bs := []service.Backend{}
		for i := uint32(1); i <= uint32(v.BackendCount); i++ {
			b, ok := bes[loader.BackendKey{SvcId: v.Id, Slot: i}]
			if !ok {
				t.Fatalf("frontend %s counts slot %d that is missing", f, i)
			}
			bs = append(bs, service.Backend{Addr: loader.BEToAddr(b.Addr), Port: loader.BEToPort(b.Port)})
			mk := loader.MemberKey{SvcId: v.Id, Addr: b.Addr, Port: b.Port}
			if slot, ok := mem[mk]; !ok {
				t.Fatalf("backend %v of %s is not a member", b, f)
			} else if slot != i {
				t.Fatalf("membership of backend %v of %s names slot %d, it is in slot %d", b, f, slot, i)
			}
			want[mk] = true
		}
		out[f] = sorted(bs)
	}
	for k := range mem {
		if !want[k] {
			t.Fatalf("membership entry %+v has no slot", k)
		}
	}
	return out
}

func TestReconcilerWritesOnlyTheDifference(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	r, err := NewReconciler(m, nil)
	if err != nil {
		t.Fatal(err)
	}
	web, dns, empty := fe("10.96.0.10", 80, service.TCP), fe("10.96.0.53", 53, service.UDP), fe("10.96.0.99", 80, service.TCP)
	desired := service.State{
		web:   {be("10.0.0.1", 8080), be("10.0.0.2", 8080), be("10.0.0.3", 8080)},
		dns:   {be("10.0.0.1", 53)},
		empty: {},
	}
	all := []service.Frontend{web, dns, empty}
	if err := r.Apply(desired.Lookup, all); err != nil {
		t.Fatal(err)
	}
	if got := mapState(t, m); !reflect.DeepEqual(got, desired) {
		t.Fatalf("maps hold %v, want %v", got, desired)
	}

	w := r.Writes()
	if err := r.Apply(desired.Lookup, all); err != nil {
		t.Fatal(err)
	}
	if r.Writes() != w {
		t.Fatalf("re-applying the same state wrote %d times", r.Writes()-w)
	}

	// Drop the first of web's backends: the last moves into its slot, the count drops, the
	// old last slot goes. DNS is not touched.
	dnsBefore, _ := m.DumpServices()
	desired[web] = []service.Backend{be("10.0.0.2", 8080), be("10.0.0.3", 8080)}
	w = r.Writes()
	if err := r.Apply(desired.Lookup, []service.Frontend{web}); err != nil {
		t.Fatal(err)
	}
	// The last slot moves into the hole (and its backend's membership entry follows it),
	// the count goes down, the trailing slot and the removed backend's membership go.
	if n := r.Writes() - w; n != 5 {
		t.Fatalf("removing one backend took %d writes, want 5", n)
	}
	if got := mapState(t, m); !reflect.DeepEqual(got, desired) {
		t.Fatalf("maps hold %v, want %v", got, desired)
	}
	dnsAfter, _ := m.DumpServices()
	if dnsBefore[svcKey(dns)] != dnsAfter[svcKey(dns)] {
		t.Fatal("updating web changed dns's frontend")
	}

	// A restarted agent starts from the maps and finds nothing to do.
	r2, err := NewReconciler(m, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := r2.Sync(desired); err != nil {
		t.Fatal(err)
	}
	if r2.Writes() != 0 {
		t.Fatalf("sync after restart wrote %d times", r2.Writes())
	}

	// Drift: someone deletes a slot and adds a stray frontend; Sync repairs both.
	m.DeleteBackend(loader.BackendKey{SvcId: dnsAfter[svcKey(dns)].Id, Slot: 1})
	m.PutService(svcKey(fe("10.96.7.7", 1, service.TCP)), loader.ServiceValue{Id: 999})
	if err := r2.Sync(desired); err != nil {
		t.Fatal(err)
	}
	if got := mapState(t, m); !reflect.DeepEqual(got, desired) {
		t.Fatalf("after repair maps hold %v, want %v", got, desired)
	}

	// Deleting a frontend removes it and its slots.
	delete(desired, empty)
	delete(desired, web)
	if err := r2.Apply(desired.Lookup, []service.Frontend{empty, web}); err != nil {
		t.Fatal(err)
	}
	if got := mapState(t, m); !reflect.DeepEqual(got, desired) {
		t.Fatalf("after delete maps hold %v, want %v", got, desired)
	}
	if bes, _ := m.DumpBackends(); len(bes) != 1 {
		t.Fatalf("%d backend slots left, want dns's 1", len(bes))
	}
}

// A backend that leaves a frontend stops being a member at once (so the datapath moves its
// UDP flows), a backend that stays keeps its membership, and a reconciler that starts on
// maps with no membership at all (left by the previous datapath layout) rebuilds it from
// the slots before anything else.
func TestMembershipFollowsBackends(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	r, _ := NewReconciler(m, nil)
	web := fe("10.96.0.10", 80, service.TCP)
	gone, stays := be("10.0.0.1", 8080), be("10.0.0.2", 8080)
	if err := r.Apply(service.State{web: {gone, stays}}.Lookup, []service.Frontend{web}); err != nil {
		t.Fatal(err)
	}
	if err := r.Apply(service.State{web: {stays}}.Lookup, []service.Frontend{web}); err != nil {
		t.Fatal(err)
	}
	id := r.fronts[web].id
	var slot uint32
	if err := m.Members.Lookup(memberKey(id, gone), &slot); !loader.IsNotExist(err) {
		t.Fatalf("removed backend is still a member: %v", err)
	}
	if err := m.Members.Lookup(memberKey(id, stays), &slot); err != nil {
		t.Fatalf("remaining backend lost its membership: %v", err)
	}

	// Wipe membership, as an upgrade from the previous layout finds it, plus a stray entry.
	mem, _ := m.DumpMembers()
	for k := range mem {
		if err := m.Members.Delete(k); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Members.Put(memberKey(id, gone), uint32(7)); err != nil {
		t.Fatal(err)
	}
	if _, err := NewReconciler(m, nil); err != nil {
		t.Fatal(err)
	}
	if got := mapState(t, m); !reflect.DeepEqual(got, service.State{web: {stays}}) {
		t.Fatalf("after restart: %v", got)
	}
}

// A first Sync into empty maps goes through batch updates; the result and the mirror must be
// the same as entry by entry, so later incremental changes work on top of it.
func TestBulkLoadIntoEmptyMaps(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	r, _ := NewReconciler(m, nil)
	desired := service.State{}
	for i := 0; i < 300; i++ {
		f := fe(fmt.Sprintf("10.96.%d.%d", i/200, i%200), 80, service.TCP)
		desired[f] = []service.Backend{be(fmt.Sprintf("10.0.%d.%d", i/200, i%200), 8080), be(fmt.Sprintf("10.1.%d.%d", i/200, i%200), 9090)}
	}
	if err := r.Sync(desired); err != nil {
		t.Fatal(err)
	}
	if got := mapState(t, m); !reflect.DeepEqual(got, desired) {
		t.Fatal("bulk load does not match the desired state")
	}
	f := fe("10.96.0.7", 80, service.TCP)
	desired[f] = desired[f][:1]
	w := r.Writes()
	if err := r.Apply(desired.Lookup, []service.Frontend{f}); err != nil {
		t.Fatal(err)
	}
	if r.Writes()-w != 3 { // count down, last slot gone, its membership gone
		t.Fatalf("incremental change after bulk load took %d writes", r.Writes()-w)
	}
	if got := mapState(t, m); !reflect.DeepEqual(got, desired) {
		t.Fatal("maps diverge after an incremental change on a bulk-loaded state")
	}

	// One backend behind 50 frontends: nothing limits how many frontends share a backend.
	d2 := loadertest.New(t, loader.Config{})
	r2, _ := NewReconciler(d2.Maps(), nil)
	shared := service.State{}
	for i := 0; i < 50; i++ {
		shared[fe(fmt.Sprintf("10.96.1.%d", i), 80, service.TCP)] = []service.Backend{be("10.0.9.9", 9090)}
	}
	if err := r2.Sync(shared); err != nil {
		t.Fatal(err)
	}
	if got := mapState(t, d2.Maps()); !reflect.DeepEqual(got, shared) {
		t.Fatal("50 frontends sharing a backend not loaded")
	}
}

func TestLayoutKeepsSurvivorsInPlace(t *testing.T) {
	b1, b2, b3, b4 := be("10.0.0.1", 1), be("10.0.0.2", 1), be("10.0.0.3", 1), be("10.0.0.4", 1)
	cases := []struct {
		old, desired, want []service.Backend
	}{
		{nil, []service.Backend{b1, b2}, []service.Backend{b1, b2}},
		{[]service.Backend{b1, b2, b3}, []service.Backend{b1, b3}, []service.Backend{b1, b3}},                 // last fills the hole
		{[]service.Backend{b1, b2, b3}, []service.Backend{b1, b2, b3, b4}, []service.Backend{b1, b2, b3, b4}}, // append
		{[]service.Backend{b1, b2, b3}, []service.Backend{b4, b2, b3}, []service.Backend{b4, b2, b3}},         // replace in place
		{[]service.Backend{b1, b2, b3}, []service.Backend{b3}, []service.Backend{b3}},
		{[]service.Backend{b1, b2}, nil, []service.Backend{}},
	}
	for _, c := range cases {
		got := layout(c.old, c.desired)
		if len(got) != len(c.want) || (len(got) > 0 && !reflect.DeepEqual(got, c.want)) {
			t.Errorf("layout(%v, %v) = %v, want %v", c.old, c.desired, got, c.want)
		}
	}
}

func fe(addr string, port uint16, p service.Protocol) service.Frontend {
	return service.Frontend{Addr: netip.MustParseAddr(addr), Port: port, Proto: p}
}

func be(addr string, port uint16) service.Backend {
	return service.Backend{Addr: netip.MustParseAddr(addr), Port: port}
}

// sorted orders backends the way service.State holds them.
func sorted(bs []service.Backend) []service.Backend {
	slices.SortFunc(bs, func(a, b service.Backend) int {
		if c := a.Addr.Compare(b.Addr); c != 0 {
			return c
		}
		return int(a.Port) - int(b.Port)
	})
	return slices.Compact(bs)
}
