package service

import (
	"fmt"
	"reflect"
	"testing"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// mapState decodes the kernel maps back into a State, independently of the reconciler's
// mirror, and checks the reverse-NAT index covers every backend.
func mapState(t *testing.T, m *loader.Maps) State {
	t.Helper()
	svcs, err := m.DumpServices()
	if err != nil {
		t.Fatal(err)
	}
	bes, _ := m.DumpBackends()
	rev, _ := m.DumpRevNAT()
	out := State{}
	for k, v := range svcs {
		f := Frontend{Addr: loader.BEToAddr(k.Addr), Port: loader.BEToPort(k.Port), Proto: Protocol(k.Proto)}
		bs := []Backend{}
		for i := uint32(1); i <= uint32(v.BackendCount); i++ {
			b, ok := bes[loader.BackendKey{SvcId: v.Id, Slot: i}]
			if !ok {
				t.Fatalf("frontend %s counts slot %d that is missing", f, i)
			}
			bs = append(bs, Backend{Addr: loader.BEToAddr(b.Addr), Port: loader.BEToPort(b.Port)})
			rv := rev[loader.RevNATKey{Addr: b.Addr, Port: b.Port, Proto: k.Proto}]
			found := false
			for _, fe := range rv.Frontends[:rv.Count] {
				found = found || (fe.Addr == k.Addr && fe.Port == k.Port)
			}
			if !found {
				t.Fatalf("backend %v of %s has no reverse-NAT entry", b, f)
			}
		}
		out[f] = normalize(bs)
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
	web, dns, empty := fe("10.96.0.10", 80, TCP), fe("10.96.0.53", 53, UDP), fe("10.96.0.99", 80, TCP)
	desired := State{
		web:   {be("10.0.0.1", 8080), be("10.0.0.2", 8080), be("10.0.0.3", 8080)},
		dns:   {be("10.0.0.1", 53)},
		empty: {},
	}
	all := []Frontend{web, dns, empty}
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
	desired[web] = []Backend{be("10.0.0.2", 8080), be("10.0.0.3", 8080)}
	w = r.Writes()
	if err := r.Apply(desired.Lookup, []Frontend{web}); err != nil {
		t.Fatal(err)
	}
	if n := r.Writes() - w; n != 3 {
		t.Fatalf("removing one backend took %d writes, want 3", n)
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
	m.PutService(svcKey(fe("10.96.7.7", 1, TCP)), loader.ServiceValue{Id: 999})
	if err := r2.Sync(desired); err != nil {
		t.Fatal(err)
	}
	if got := mapState(t, m); !reflect.DeepEqual(got, desired) {
		t.Fatalf("after repair maps hold %v, want %v", got, desired)
	}

	// Deleting a frontend removes it and its slots.
	delete(desired, empty)
	delete(desired, web)
	if err := r2.Apply(desired.Lookup, []Frontend{empty, web}); err != nil {
		t.Fatal(err)
	}
	if got := mapState(t, m); !reflect.DeepEqual(got, desired) {
		t.Fatalf("after delete maps hold %v, want %v", got, desired)
	}
	if bes, _ := m.DumpBackends(); len(bes) != 1 {
		t.Fatalf("%d backend slots left, want dns's 1", len(bes))
	}
}

func TestRetiredReverseNATWaitsForFlows(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	r, _ := NewReconciler(m, nil)
	web := fe("10.96.0.10", 80, TCP)
	gone, stays := be("10.0.0.1", 8080), be("10.0.0.2", 8080)
	if err := r.Apply(State{web: {gone, stays}}.Lookup, []Frontend{web}); err != nil {
		t.Fatal(err)
	}
	// A live flow from a client to web, served by the backend about to be removed.
	ck := loader.CTKey{Saddr: loader.AddrToBE(be("10.0.9.9", 0).Addr), Daddr: svcKey(web).Addr,
		Sport: loader.PortToBE(40000), Dport: svcKey(web).Port, Proto: uint8(TCP)}
	if err := m.CT.Put(ck, loader.CTValue{ExpiresNs: ^uint64(0), BackendAddr: loader.AddrToBE(gone.Addr), BackendPort: loader.PortToBE(gone.Port)}); err != nil {
		t.Fatal(err)
	}
	if err := r.Apply(State{web: {stays}}.Lookup, []Frontend{web}); err != nil {
		t.Fatal(err)
	}
	revKey := pairOf(web, gone).backend
	if n, err := r.CollectRevNAT(); err != nil || n != 0 {
		t.Fatalf("collected %d (%v) while a flow still uses the backend", n, err)
	}
	var v loader.RevNATValue
	if err := m.RevNAT.Lookup(revKey, &v); err != nil || v.Count != 1 {
		t.Fatalf("reverse NAT for the removed backend vanished under a live flow: %v %+v", err, v)
	}
	// An expired flow the LRU has not evicted yet does not hold the entry either.
	if err := m.CT.Put(ck, loader.CTValue{ExpiresNs: 1, BackendAddr: loader.AddrToBE(gone.Addr), BackendPort: loader.PortToBE(gone.Port)}); err != nil {
		t.Fatal(err)
	}
	if n, err := r.CollectRevNAT(); err != nil || n != 1 {
		t.Fatalf("collected %d (%v), want 1 once the flow has expired", n, err)
	}
	if err := m.RevNAT.Lookup(revKey, &v); !loader.IsNotExist(err) {
		t.Fatalf("reverse NAT entry still there: %v", err)
	}
}

// A first Sync into empty maps goes through batch updates; the result and the mirror must be
// the same as entry by entry, so later incremental changes work on top of it.
func TestBulkLoadIntoEmptyMaps(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	r, _ := NewReconciler(m, nil)
	desired := State{}
	for i := 0; i < 300; i++ {
		f := fe(fmt.Sprintf("10.96.%d.%d", i/200, i%200), 80, TCP)
		desired[f] = []Backend{be(fmt.Sprintf("10.0.%d.%d", i/200, i%200), 8080), be(fmt.Sprintf("10.1.%d.%d", i/200, i%200), 9090)}
	}
	if err := r.Sync(desired); err != nil {
		t.Fatal(err)
	}
	if got := mapState(t, m); !reflect.DeepEqual(got, desired) {
		t.Fatal("bulk load does not match the desired state")
	}
	f := fe("10.96.0.7", 80, TCP)
	desired[f] = desired[f][:1]
	w := r.Writes()
	if err := r.Apply(desired.Lookup, []Frontend{f}); err != nil {
		t.Fatal(err)
	}
	if r.Writes()-w != 2 { // count down, last slot gone
		t.Fatalf("incremental change after bulk load took %d writes", r.Writes()-w)
	}
	if got := mapState(t, m); !reflect.DeepEqual(got, desired) {
		t.Fatal("maps diverge after an incremental change on a bulk-loaded state")
	}

	// One backend behind 9 frontends: the datapath can reverse-NAT 8; the 9th is counted.
	d2 := loadertest.New(t, loader.Config{})
	r2, _ := NewReconciler(d2.Maps(), nil)
	shared := State{}
	for i := 0; i < 9; i++ {
		shared[fe(fmt.Sprintf("10.96.1.%d", i), 80, TCP)] = []Backend{be("10.0.9.9", 9090)}
	}
	if err := r2.Sync(shared); err != nil {
		t.Fatal(err)
	}
	if r2.RevNATOverflows() != 1 {
		t.Fatalf("reverse-NAT overflows counted %d, want 1", r2.RevNATOverflows())
	}
}
