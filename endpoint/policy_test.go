package endpoint

import (
	"net/netip"
	"testing"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// SetPolicy writes identities and EP_F_POLICY into recorded endpoints and their ipcache
// entries, and Upsert applies it to pods attached later, by pod name before address.
func TestSetPolicyAssignsIdentities(t *testing.T) {
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
	a, b := netip.MustParseAddr("10.0.1.10"), netip.MustParseAddr("10.0.1.11")
	if err := reg.Upsert(Endpoint{IfIndex: 41, Addr: a, Pod: "ns/a"}); err != nil {
		t.Fatal(err)
	}
	enforce := true
	byName := map[string]uint32{"ns/a": 300, "ns/b": 400}
	byAddr := map[netip.Addr]uint32{a: 999, b: 999}
	if err := reg.SetPolicy(func(pod string, addr netip.Addr) (uint32, bool) {
		if id, ok := byName[pod]; ok {
			return id, enforce
		}
		return byAddr[addr], enforce
	}); err != nil {
		t.Fatal(err)
	}
	check := func(ifindex uint32, addr netip.Addr, id uint32, flags uint16) {
		t.Helper()
		var ev loader.EndpointValue
		if err := m.Endpoints.Lookup(loader.EndpointKey{Ifindex: ifindex}, &ev); err != nil {
			t.Fatal(err)
		}
		if ev.Identity != id || ev.Flags != flags {
			t.Fatalf("endpoint %d: identity %d flags %#x, want %d %#x", ifindex, ev.Identity, ev.Flags, id, flags)
		}
		if v, ok := lpm(t, m, addr.String()); !ok || v.Identity != id {
			t.Fatalf("ipcache %s: %+v %v, want identity %d", addr, v, ok, id)
		}
	}
	check(41, a, 300, loader.EndpointFlagPolicy)
	if err := reg.Upsert(Endpoint{IfIndex: 42, Addr: b, Pod: "ns/b"}); err != nil {
		t.Fatal(err)
	}
	check(42, b, 400, loader.EndpointFlagPolicy)
	enforce = false
	if err := reg.SetPolicy(func(pod string, addr netip.Addr) (uint32, bool) { return byName[pod], enforce }); err != nil {
		t.Fatal(err)
	}
	check(41, a, 300, 0)
	check(42, b, 400, 0)

	// Only other nodes' pod addresses are listed for a restarted agent to clean up.
	remote := netip.MustParseAddr("10.0.2.20")
	if err := cache.Set(netip.PrefixFrom(remote, 32), Entry{Identity: 500, Flags: loader.IPCacheFlagPod}); err != nil {
		t.Fatal(err)
	}
	reopened, err := NewIPCache(m)
	if err != nil {
		t.Fatal(err)
	}
	if got := reopened.PodAddrs(); len(got) != 1 || got[0] != remote {
		t.Fatalf("PodAddrs = %v, want [%s]", got, remote)
	}
}
