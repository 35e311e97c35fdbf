package policymap_test

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/policy/policymap"
)

// A sync that does not fit leaves its partial additions in the maps; a later sync that fits
// must still succeed (it deletes what it drops before writing), not fail on them for good.
func TestSyncRecoversFromAFullMap(t *testing.T) {
	testutil.RequirePrivileged(t)
	const room = 8
	lpm := func(key, value uint32, n uint32) *ebpf.Map {
		m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.LPMTrie, KeySize: key, ValueSize: value, MaxEntries: n, Flags: 1 /* BPF_F_NO_PREALLOC */})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	var (
		rk loader.PolicyKey
		rv loader.PolicyValue
		ck loader.PolicyCIDRKey
		cv loader.PolicyCIDRValue
	)
	iso, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: uint32(sizeOf(t, loader.PolicyIsoValue{})), MaxEntries: room})
	if err != nil {
		t.Fatal(err)
	}
	defer iso.Close()
	maps := &loader.PolicyMaps{Rules: lpm(uint32(sizeOf(t, rk)), uint32(sizeOf(t, rv)), room), Isolation: iso,
		CIDRs: lpm(uint32(sizeOf(t, ck)), uint32(sizeOf(t, cv)), room)}
	w, err := policymap.NewWriter(maps)
	if err != nil {
		t.Fatal(err)
	}
	cidrs := func(from, n int) policymap.Entries {
		e := policymap.Entries{CIDRs: map[loader.PolicyCIDRKey]loader.PolicyCIDRValue{}}
		for i := from; i < from+n; i++ {
			e.CIDRs[policymap.CIDRKey(netip.MustParsePrefix(fmt.Sprintf("10.200.0.%d/32", i)))] = loader.PolicyCIDRValue{Identity: uint32(i)}
		}
		return e
	}
	if _, err := w.Sync(cidrs(0, room)); err != nil {
		t.Fatalf("a sync that fits: %v", err)
	}
	if _, err := w.Sync(cidrs(room, 2*room)); err == nil {
		t.Fatal("a sync twice the map's size succeeded")
	}
	// Fewer entries than the map holds, none of them the old ones.
	if _, err := w.Sync(cidrs(100, room/2)); err != nil {
		t.Fatalf("a sync that fits, after one that did not: %v", err)
	}
	var k loader.PolicyCIDRKey
	var v loader.PolicyCIDRValue
	n := 0
	for it := maps.CIDRs.Iterate(); it.Next(&k, &v); {
		n++
	}
	if n != room/2 {
		t.Fatalf("the map holds %d prefixes, want the %d of the last sync", n, room/2)
	}
}

func sizeOf(t *testing.T, v any) int {
	t.Helper()
	n := binary.Size(v)
	if n <= 0 {
		t.Fatalf("size of %T: %d", v, n)
	}
	return n
}
