package lbmap

import (
	"fmt"
	"testing"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
)

// Options become frontend flags, an options entry and a Maglev table whose entries name
// the slots of the frontend's backends; turning them off or removing the frontend leaves
// nothing behind; a restarted reconciler reads them back and has nothing to write.
func TestReconcilerEncodesOptions(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	r, err := NewReconciler(m, nil)
	if err != nil {
		t.Fatal(err)
	}
	web := fe("10.96.0.10", 80, service.TCP)
	var bs []service.Backend
	for i := range 5 {
		bs = append(bs, be(fmt.Sprintf("10.0.0.%d", i+1), 8080))
	}
	desired := service.State{web: bs}
	opts := service.Options{AffinitySeconds: 60, MaglevSize: service.MaglevSize(len(bs), 0)}
	lookup := func(service.Frontend) service.Options { return opts }
	if err := r.ApplyWith(desired.Lookup, lookup, []service.Frontend{web}); err != nil {
		t.Fatal(err)
	}
	check := func(wantFlags uint16, wantOpts *loader.SvcOpts, wantBlocks int) {
		t.Helper()
		svcs, _ := m.DumpServices()
		sv, ok := svcs[svcKey(web)]
		if !ok {
			t.Fatal("frontend missing")
		}
		if sv.Flags != wantFlags {
			t.Fatalf("flags %#x, want %#x", sv.Flags, wantFlags)
		}
		all, _ := m.DumpOpts()
		o, ok := all[sv.Id]
		switch {
		case wantOpts == nil && len(all) != 0:
			t.Fatalf("options map holds %v, want nothing", all)
		case wantOpts != nil && (!ok || o != *wantOpts):
			t.Fatalf("options %+v (present %v), want %+v", o, ok, *wantOpts)
		}
		blocks, _ := m.DumpMaglev()
		if len(blocks) != wantBlocks {
			t.Fatalf("%d Maglev blocks, want %d", len(blocks), wantBlocks)
		}
		// Every entry names a slot in 1..count, and each slot holds its fair share.
		count := map[uint16]int{}
		for k, b := range blocks {
			for i, s := range b.Slot {
				idx := k.Block*loader.MaglevBlock + uint32(i)
				if idx >= wantOpts.MaglevSize {
					if s != 0 {
						t.Fatalf("entry %d past the table's %d holds slot %d", idx, wantOpts.MaglevSize, s)
					}
					continue
				}
				if s == 0 || s > sv.BackendCount {
					t.Fatalf("entry %d names slot %d of %d", idx, s, sv.BackendCount)
				}
				count[s]++
			}
		}
		if wantBlocks > 0 {
			fair := int(wantOpts.MaglevSize) / int(sv.BackendCount)
			for s, c := range count {
				if c < fair-fair/50-1 || c > fair+fair/50+1 {
					t.Fatalf("slot %d holds %d entries, fair share %d", s, c, fair)
				}
			}
		}
	}
	check(loader.SvcFlagAffinity|loader.SvcFlagMaglev, &loader.SvcOpts{AffinityTimeoutS: 60, MaglevSize: 509}, (509+15)/16)

	// A restarted agent reads it all back: nothing to write.
	r2, err := NewReconciler(m, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := r2.SyncWith(desired, lookup); err != nil {
		t.Fatal(err)
	}
	if r2.Writes() != 0 {
		t.Fatalf("sync after restart wrote %d times", r2.Writes())
	}

	// Grow to 6 backends: the table grows to 1021 entries.
	bs = append(bs, be("10.0.0.6", 8080))
	desired[web] = bs
	opts.MaglevSize = service.MaglevSize(len(bs), 0)
	if err := r2.ApplyWith(desired.Lookup, lookup, []service.Frontend{web}); err != nil {
		t.Fatal(err)
	}
	check(loader.SvcFlagAffinity|loader.SvcFlagMaglev, &loader.SvcOpts{AffinityTimeoutS: 60, MaglevSize: 1021}, (1021+15)/16)

	// Maglev off, affinity kept: the table goes, the options entry stays.
	opts.MaglevSize = 0
	if err := r2.ApplyWith(desired.Lookup, lookup, []service.Frontend{web}); err != nil {
		t.Fatal(err)
	}
	check(loader.SvcFlagAffinity, &loader.SvcOpts{AffinityTimeoutS: 60, MaglevSize: 0}, 0)

	// Nothing left but the drop flag on an empty frontend.
	opts = service.Options{DropWhenEmpty: true}
	desired[web] = []service.Backend{}
	if err := r2.ApplyWith(desired.Lookup, lookup, []service.Frontend{web}); err != nil {
		t.Fatal(err)
	}
	check(loader.SvcFlagDropEmpty, nil, 0)

	// Removing a Maglev frontend removes its table and options.
	opts = service.Options{AffinitySeconds: 10, MaglevSize: 509}
	desired[web] = bs
	if err := r2.ApplyWith(desired.Lookup, lookup, []service.Frontend{web}); err != nil {
		t.Fatal(err)
	}
	delete(desired, web)
	if err := r2.ApplyWith(desired.Lookup, lookup, []service.Frontend{web}); err != nil {
		t.Fatal(err)
	}
	if o, _ := m.DumpOpts(); len(o) != 0 {
		t.Fatalf("options left after removal: %v", o)
	}
	if b, _ := m.DumpMaglev(); len(b) != 0 {
		t.Fatalf("%d Maglev blocks left after removal", len(b))
	}
}
