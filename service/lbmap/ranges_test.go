package lbmap

import (
	"testing"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
)

// External frontends get the external flag; a LoadBalancer IP with source ranges gets the
// ranges flag and exactly its ranges in tern_lb_src_ranges, which follow a change of the
// ranges, survive a restarted reconciler and leave with the frontend.
func TestReconcilerSourceRanges(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	r, err := NewReconciler(m, nil)
	if err != nil {
		t.Fatal(err)
	}
	lb, np := fe("192.0.2.100", 80, service.TCP), fe("10.0.0.10", 30080, service.TCP)
	desired := service.State{lb: {be("10.0.1.1", 8080)}, np: {be("10.0.1.1", 8080)}}
	opts := map[service.Frontend]service.Options{
		lb: {Kind: service.KindLoadBalancer, SourceRanges: "10.0.0.0/8,203.0.113.0/24"},
		np: {Kind: service.KindNodePort},
	}
	lookup := func(f service.Frontend) service.Options { return opts[f] }
	check := func(wantRanges ...string) {
		t.Helper()
		svcs, _ := m.DumpServices()
		// External, and the kind bits (for ternctl) say which part of the Service.
		if got := svcs[svcKey(np)].Flags; got != loader.SvcFlagExternal|uint16(service.KindNodePort)<<loader.SvcKindShift {
			t.Fatalf("NodePort flags %#x, want external and kind NodePort only", got)
		}
		sv, ok := svcs[svcKey(lb)]
		wantFlags := uint16(loader.SvcFlagExternal) | uint16(service.KindLoadBalancer)<<loader.SvcKindShift
		if len(wantRanges) > 0 {
			wantFlags |= loader.SvcFlagSrcRanges
		}
		if ok && sv.Flags != wantFlags {
			t.Fatalf("LB flags %#x, want %#x", sv.Flags, wantFlags)
		}
		rs, err := m.DumpSrcRanges()
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]bool{}
		for k := range rs {
			if k.SvcId != sv.Id {
				t.Fatalf("range %s of frontend id %d, want %d", k.Prefix(), k.SvcId, sv.Id)
			}
			got[k.Prefix().String()] = true
		}
		if len(got) != len(wantRanges) {
			t.Fatalf("ranges %v, want %v", got, wantRanges)
		}
		for _, w := range wantRanges {
			if !got[w] {
				t.Fatalf("ranges %v lack %s", got, w)
			}
		}
	}
	if err := r.ApplyWith(desired.Lookup, lookup, []service.Frontend{lb, np}); err != nil {
		t.Fatal(err)
	}
	check("10.0.0.0/8", "203.0.113.0/24")

	opts[lb] = service.Options{Kind: service.KindLoadBalancer, SourceRanges: "203.0.113.0/24,198.51.100.0/24"}
	if err := r.ApplyWith(desired.Lookup, lookup, []service.Frontend{lb}); err != nil {
		t.Fatal(err)
	}
	check("198.51.100.0/24", "203.0.113.0/24")

	r2, err := NewReconciler(m, nil)
	if err != nil {
		t.Fatal(err)
	}
	w := r2.Writes()
	if err := r2.ApplyWith(desired.Lookup, lookup, []service.Frontend{lb, np}); err != nil {
		t.Fatal(err)
	}
	if r2.Writes() != w {
		t.Fatalf("a restarted reconciler wrote %d entries for unchanged frontends", r2.Writes()-w)
	}

	opts[lb] = service.Options{Kind: service.KindLoadBalancer}
	if err := r.ApplyWith(desired.Lookup, lookup, []service.Frontend{lb}); err != nil {
		t.Fatal(err)
	}
	check()
	opts[lb] = service.Options{Kind: service.KindLoadBalancer, SourceRanges: "203.0.113.0/24"}
	if err := r.ApplyWith(desired.Lookup, lookup, []service.Frontend{lb}); err != nil {
		t.Fatal(err)
	}
	delete(desired, lb)
	if err := r.ApplyWith(desired.Lookup, lookup, []service.Frontend{lb}); err != nil {
		t.Fatal(err)
	}
	if rs, _ := m.DumpSrcRanges(); len(rs) != 0 {
		t.Fatalf("ranges left after the frontend went: %v", rs)
	}
}
