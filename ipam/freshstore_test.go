package ipam

import (
	"context"
	"errors"
	"maps"
	"net/netip"
	"os"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	promtest "github.com/prometheus/client_golang/prometheus/testutil"
)

// TestEmptyStoreRecoversTheNodesENIsAtStart is a node that comes back with a new disk under
// the same instance (its system disk replaced; its pods died with it): the cloud still has the
// node's ENIs attached with their addresses, the store knows nothing. The new pool must take
// those ENIs at Start — before ListingGrace, which here is an hour — and serve pods from
// them, creating no ENI: a pool that waited would start empty and its refill would create
// ENIs for the slots its own ENIs hold (seen in the lab: a third ENI created, then
// EniPerInstanceLimitExceeded on every refill until the grace ran out).
func TestEmptyStoreRecoversTheNodesENIsAtStart(t *testing.T) {
	e := newEnv(t)
	e.grace = time.Hour
	cfg := eniConf(t, 0, 5, "vsw-test-a")

	p1, st1 := e.startPool(bigNode, cfg)
	allocateAll(t, p1, 0, 25) // 20 addresses per ENI: two ENIs
	var enis []string
	for _, es := range p1.Status().ENIs {
		enis = append(enis, es.ID)
	}
	slices.Sort(enis)
	if len(enis) != 2 {
		t.Fatalf("the pool grew to %d ENIs for 25 pods, want 2", len(enis))
	}
	p1.Stop()
	if err := st1.Close(); err != nil {
		t.Fatal(err)
	}
	// The VM is back with a new disk: its pods died with it, the store is gone.
	if err := os.Remove(e.dbPath); err != nil {
		t.Fatal(err)
	}
	created := e.emu.Snapshot().Calls["CreateNetworkInterface"]

	p2, st2 := e.startPool(bigNode, cfg)
	defer st2.Close()
	defer p2.Stop()
	var got []string
	for _, es := range p2.Status().ENIs {
		got = append(got, es.ID)
	}
	slices.Sort(got)
	if !slices.Equal(got, enis) {
		t.Fatalf("after a start on an empty store the pool holds ENIs %v, want the node's own %v", got, enis)
	}
	if n := promtest.ToFloat64(p2.m.settled.WithLabelValues("adopted_eni")); n != 2 {
		t.Errorf("tern_ipam_cloud_disagreements_total{action=\"adopted_eni\"} is %v after recovering 2 ENIs, want 2", n)
	}
	after := allocateAll(t, p2, 100, 25)
	for k, a := range after {
		if !slices.Contains(enis, a.ENI.ID) {
			t.Errorf("%s got %s on ENI %s, not on one of the node's own ENIs %v", k, a.IP, a.ENI.ID, enis)
		}
	}
	if n := e.emu.Snapshot().Calls["CreateNetworkInterface"] - created; n != 0 {
		t.Fatalf("the pool created %d ENIs after a start on an empty store: it must recover the node's own", n)
	}
}

// TestStoreDeletedUnderLivePodsNeverGivesTheirAddresses is the other empty-store start: the
// store was deleted (by hand, or a state directory mounted from a new volume) while the node's
// pods kept running. The recovered ENIs' addresses are the live pods' own; while the live-pod
// source cannot answer (the apiserver unreachable) none of them may be handed out, and once
// it answers they are the pods' allocations again (Release works), the rest idle — also after
// a restart in between. Then the node is filled: no new pod gets a live pod's address.
func TestStoreDeletedUnderLivePodsNeverGivesTheirAddresses(t *testing.T) {
	e := newEnv(t)
	e.grace = 200 * time.Millisecond // the pool asks the live-pod source again after each grace
	cfg := eniConf(t, 0, 5, "vsw-test-a")

	p1, st1 := e.startPool(bigNode, cfg)
	live := allocateAll(t, p1, 0, 25) // two ENIs
	p1.Stop()
	if err := st1.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(e.dbPath); err != nil {
		t.Fatal(err)
	}
	byIP := map[netip.Addr]PodKey{}
	for k, a := range live {
		byIP[a.IP] = k
	}
	var answering atomic.Bool
	var asked atomic.Int32
	e.livePods = func(context.Context) (map[netip.Addr]PodKey, error) {
		asked.Add(1)
		if !answering.Load() {
			return nil, errors.New("apiserver unreachable")
		}
		return maps.Clone(byIP), nil
	}

	p2, st2 := e.startPool(bigNode, cfg)
	defer st2.Close()
	defer p2.Stop()
	if s := p2.Status(); len(s.ENIs) != 2 || s.Idle != 0 {
		t.Fatalf("while the live pods are unknown the pool has %d ENIs and %d idle addresses, want the node's 2 ENIs and none idle", len(s.ENIs), s.Idle)
	}
	// New pods meanwhile get new addresses, never a held one.
	during := allocateAll(t, p2, 100, 10)
	for k, a := range during {
		if owner, ok := byIP[a.IP]; ok {
			t.Fatalf("%s got %s while the live pods were unknown: live pod %s holds it", k, a.IP, owner)
		}
	}
	if len(p2.Allocations()) != 10 {
		t.Fatalf("the pool has %d allocations before the live pods are known, want the 10 new ones", len(p2.Allocations()))
	}
	// The agent dies before the source answers: its store has the adopted ENIs and the new
	// pods, not the live ones. The next start must hold again, not take them for idle.
	p2.Stop()
	if err := st2.Close(); err != nil {
		t.Fatal(err)
	}
	p2, st2 = e.startPool(bigNode, cfg)
	defer st2.Close()
	defer p2.Stop()
	if s := p2.Status(); s.Idle != 0 {
		t.Fatalf("a restart while the live pods were still unknown left %d addresses idle, want none", s.Idle)
	}
	for k, a := range allocateAll(t, p2, 150, 5) {
		if owner, ok := byIP[a.IP]; ok {
			t.Fatalf("%s got %s after a restart while the live pods were unknown: live pod %s holds it", k, a.IP, owner)
		}
	}

	answering.Store(true)
	deadline := time.Now().Add(20 * time.Second)
	for len(p2.Allocations()) != 40 {
		if time.Now().After(deadline) {
			t.Fatalf("the live pods' allocations were not recovered once the source answered (asked %d times; %d allocations)", asked.Load(), len(p2.Allocations()))
		}
		time.Sleep(20 * time.Millisecond)
	}
	got := p2.Allocations()
	for k, a := range live {
		if g, ok := got[k]; !ok || g.IP != a.IP {
			t.Errorf("live pod %s: after the restart its allocation is %v (%v), want %s", k, g.IP, ok, a.IP)
		}
	}
	if n := promtest.ToFloat64(p2.m.settled.WithLabelValues("recovered_allocation")); n != 25 {
		t.Errorf("tern_ipam_cloud_disagreements_total{action=\"recovered_allocation\"} is %v, want 25", n)
	}

	// Fill the node: as many new pods as it has room for, none on a live pod's address.
	room := p2.Capacity().MaxPods - 40
	after := allocateAll(t, p2, 200, room)
	for k, a := range after {
		if owner, ok := byIP[a.IP]; ok {
			t.Errorf("%s got %s: live pod %s holds it", k, a.IP, owner)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := p2.Allocate(ctx, podKey(999)); !errors.Is(err, ErrNodeFull) {
		t.Fatalf("a pod beyond the node's %d: %v, want ErrNodeFull", p2.Capacity().MaxPods, err)
	}
	seen := map[netip.Addr]PodKey{}
	for k, a := range p2.Allocations() {
		if o, dup := seen[a.IP]; dup {
			t.Errorf("%s given to both %s and %s", a.IP, o, k)
		}
		seen[a.IP] = k
	}

	// A recovered allocation is released like any other, and its address serves the next pod.
	if err := p2.Release(ctx, podKey(0)); err != nil {
		t.Fatal(err)
	}
	if _, ok := p2.Allocations()[podKey(0)]; ok {
		t.Fatal("the recovered allocation of pod-0 is still there after Release")
	}
	a, err := p2.Allocate(ctx, podKey(1000))
	if err != nil {
		t.Fatal(err)
	}
	if a.IP != live[podKey(0)].IP {
		t.Errorf("the pod after pod-0's release got %s, want pod-0's released %s (the only free address)", a.IP, live[podKey(0)].IP)
	}
}
