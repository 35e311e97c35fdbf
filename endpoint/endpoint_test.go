package endpoint

import (
	"net"
	"net/netip"
	"testing"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// lpm asks the kernel's LPM trie what covers addr, independently of the reconcilers' mirrors.
func lpm(t *testing.T, m *loader.Maps, addr string) (loader.IPCacheValue, bool) {
	t.Helper()
	var v loader.IPCacheValue
	err := m.IPCache.Lookup(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(netip.MustParseAddr(addr))}, &v)
	if loader.IsNotExist(err) {
		return v, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return v, true
}

func TestRegistryAndIPCacheFollowPods(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	cache, err := NewIPCache(m)
	if err != nil {
		t.Fatal(err)
	}
	reg, err := NewRegistry(m, cache)
	if err != nil {
		t.Fatal(err)
	}
	mac := net.HardwareAddr{0x02, 0, 0, 0, 0, 9}
	if err := reg.Upsert(Endpoint{IfIndex: 41, Addr: netip.MustParseAddr("10.0.1.10"), MAC: mac}); err != nil {
		t.Fatal(err)
	}
	if err := reg.Upsert(Endpoint{IfIndex: 42, Addr: netip.MustParseAddr("10.0.1.11")}); err != nil {
		t.Fatal(err)
	}
	// A CIDR (a remote node's pods, an ipBlock) and a pod inside it: the longest prefix wins.
	if err := cache.Set(netip.MustParsePrefix("10.0.0.0/16"), Entry{Identity: 7, Flags: loader.IPCacheFlagPod, Node: netip.MustParseAddr("192.168.0.2")}); err != nil {
		t.Fatal(err)
	}

	var ev loader.EndpointValue
	if err := m.Endpoints.Lookup(loader.EndpointKey{Ifindex: 41}, &ev); err != nil {
		t.Fatal(err)
	}
	if loader.BEToAddr(ev.Addr) != netip.MustParseAddr("10.0.1.10") || net.HardwareAddr(ev.Mac[:]).String() != mac.String() {
		t.Fatalf("endpoint 41 holds %+v", ev)
	}
	if v, ok := lpm(t, m, "10.0.1.10"); !ok || v.Flags != loader.IPCacheFlagLocal|loader.IPCacheFlagPod {
		t.Fatalf("ipcache for a local pod: %+v %v", v, ok)
	}
	// An exclusive-ENI pod's address is marked so: flows to it are translated to the node
	// (bpf/lib/exclusive.h).
	if err := reg.Upsert(Endpoint{IfIndex: 43, Addr: netip.MustParseAddr("10.0.1.13"), Flags: loader.EndpointFlagExclusive}); err != nil {
		t.Fatal(err)
	}
	if v, ok := lpm(t, m, "10.0.1.13"); !ok || v.Flags != loader.IPCacheFlagLocal|loader.IPCacheFlagPod|loader.IPCacheFlagExclusive {
		t.Fatalf("ipcache for a local exclusive-ENI pod: %+v %v", v, ok)
	}
	if err := reg.Delete(43); err != nil {
		t.Fatal(err)
	}
	if v, _ := lpm(t, m, "10.0.1.13"); v.Flags&(loader.IPCacheFlagLocal|loader.IPCacheFlagExclusive) != 0 {
		t.Fatalf("a deleted exclusive-ENI pod's address is still local in the ipcache: %+v", v)
	}
	if v, ok := lpm(t, m, "10.0.9.9"); !ok || v.Identity != 7 || v.Flags != loader.IPCacheFlagPod {
		t.Fatalf("ipcache for an address in the CIDR: %+v %v", v, ok)
	}
	if _, ok := lpm(t, m, "172.16.0.1"); ok {
		t.Fatal("an address outside every prefix was found")
	}

	// The interface index is reused by another pod: the old address is no longer local.
	if err := reg.Upsert(Endpoint{IfIndex: 42, Addr: netip.MustParseAddr("10.0.1.12")}); err != nil {
		t.Fatal(err)
	}
	if v, _ := lpm(t, m, "10.0.1.11"); v.Flags&loader.IPCacheFlagLocal != 0 {
		t.Fatal("the previous pod's address is still local after its ifindex was reused")
	}

	// A restarted agent starts from the maps; pods gone while it was away are pruned.
	cache2, _ := NewIPCache(m)
	reg2, err := NewRegistry(m, cache2)
	if err != nil {
		t.Fatal(err)
	}
	if got := len(reg2.List()); got != 2 {
		t.Fatalf("restarted registry sees %d endpoints, want 2", got)
	}
	n, err := reg2.Prune(func(ifindex int) bool { return ifindex == 41 })
	if err != nil || n != 1 {
		t.Fatalf("pruned %d (%v), want 1", n, err)
	}
	if err := m.Endpoints.Lookup(loader.EndpointKey{Ifindex: 42}, &ev); !loader.IsNotExist(err) {
		t.Fatalf("pruned endpoint still in the map: %v", err)
	}
	if v, _ := lpm(t, m, "10.0.1.12"); v.Flags&loader.IPCacheFlagLocal != 0 {
		t.Fatal("pruned pod's address still local in the ipcache")
	}
	if err := reg2.Delete(41); err != nil {
		t.Fatal(err)
	}
	if err := reg2.Delete(41); err != nil {
		t.Fatalf("a repeated delete: %v", err)
	}
	if err := reg2.Upsert(Endpoint{IfIndex: 0, Addr: netip.MustParseAddr("10.0.1.13")}); err == nil {
		t.Fatal("ifindex 0 accepted")
	}
}

// An agent restarted over maps an older agent wrote: a local exclusive-ENI pod's endpoint is
// there, but its ipcache entry lacks IPCacheFlagExclusive (and IPCacheFlagPolicy), which the
// datapath needs to translate flows to it and judge its ingress policy (bpf/lib/exclusive.h,
// bpf/lib/policy.h). RestoreIPCache at start puts them there without waiting for an attach.
func TestRestoreIPCacheFlagsRestoredExclusivePods(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	excl := netip.MustParseAddr("10.0.1.20")
	plain := netip.MustParseAddr("10.0.1.21")
	// What the older agent left: endpoints, and ipcache entries with only local | pod.
	for ifindex, ep := range map[uint32]loader.EndpointValue{
		51: {Addr: loader.AddrToBE(excl), Flags: loader.EndpointFlagExclusive | loader.EndpointFlagPolicy, Identity: 77},
		52: {Addr: loader.AddrToBE(plain), Identity: 78},
	} {
		if err := m.PutEndpoint(loader.EndpointKey{Ifindex: ifindex}, ep); err != nil {
			t.Fatal(err)
		}
		if err := m.PutIPCache(loader.IPCacheKey{Prefixlen: 32, Addr: ep.Addr},
			loader.IPCacheValue{Identity: ep.Identity, Flags: loader.IPCacheFlagLocal | loader.IPCacheFlagPod}); err != nil {
			t.Fatal(err)
		}
	}
	cache, err := NewIPCache(m)
	if err != nil {
		t.Fatal(err)
	}
	reg, err := NewRegistry(m, cache)
	if err != nil {
		t.Fatal(err)
	}
	n, err := reg.RestoreIPCache()
	if err != nil || n != 1 {
		t.Fatalf("RestoreIPCache rewrote %d entries (%v), want 1 (the exclusive pod's)", n, err)
	}
	want := uint16(loader.IPCacheFlagLocal | loader.IPCacheFlagPod | loader.IPCacheFlagExclusive | loader.IPCacheFlagPolicy)
	if v, ok := lpm(t, m, excl.String()); !ok || v.Flags != want || v.Identity != 77 {
		t.Fatalf("restored exclusive pod's ipcache entry: %+v %v, want flags %#x identity 77", v, ok, want)
	}
	if v, ok := lpm(t, m, plain.String()); !ok || v.Flags != loader.IPCacheFlagLocal|loader.IPCacheFlagPod || v.Identity != 78 {
		t.Fatalf("an ENIIP pod's ipcache entry changed: %+v %v", v, ok)
	}
	// A second start finds nothing to do.
	if n, err := reg.RestoreIPCache(); err != nil || n != 0 {
		t.Fatalf("second RestoreIPCache rewrote %d entries (%v), want 0", n, err)
	}
}
