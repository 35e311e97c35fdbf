package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/store"
	"github.com/tern-net/tern/test/ecsemu"
)

// The route mode against the emulator through the real SDK (no SDN).

const routeNode2 = "i-test-0002"

var (
	podCIDR1 = netip.MustParsePrefix("192.168.128.0/26")
	podCIDR2 = netip.MustParsePrefix("192.168.129.0/26")
)

type routeEnv struct {
	*env
	dir string
}

func newRouteEnv(t *testing.T) *routeEnv {
	t.Helper()
	cfg := ecsemu.TestConfig()
	cfg.AddInstance(routeNode2, "ecs.g7.large", "vsw-test-a", "192.168.1.12")
	emu, ep := ecsemu.NewTestServer(t, cfg)
	// Short but asynchronous: a new entry is Pending for a while, and a second node's create
	// meets it (IncorrectRouteEntryStatus) when both start together.
	emu.SetDelays(ecsemu.TransitionDelays{Route: ecsemu.Duration(40 * time.Millisecond), RouteDelete: ecsemu.Duration(10 * time.Millisecond)})
	return &routeEnv{env: &env{t: t, emu: emu, endpoint: ep}, dir: t.TempDir()}
}

func (e *routeEnv) newRoutePool(instance, node string, cidr netip.Prefix) (*RoutePool, *store.Store) {
	e.t.Helper()
	st, err := store.Open(filepath.Join(e.dir, node+".db"), time.Second)
	if err != nil {
		e.t.Fatal(err)
	}
	c := e.client()
	p, err := NewRoutePool(RouteOptions{Cloud: c, Routes: c, Store: st, InstanceID: instance, NodeName: node,
		ClusterID: clusterTag, PodCIDR: cidr, CheckInterval: time.Hour, Logger: zaptest.NewLogger(e.t).Named(node)})
	if err != nil {
		e.t.Fatal(err)
	}
	return p, st
}

func (e *routeEnv) start(p *RoutePool) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.Start(ctx); err != nil {
		e.t.Fatal(err)
	}
}

// routesOf is the emulator's route table as destination → next hop, Available entries only.
func routesOf(s ecsemu.State) map[string]string {
	out := map[string]string{}
	for _, r := range s.Routes {
		if r.Status == ecsemu.RouteStatusAvailable {
			out[r.Destination] = r.NextHopID
		}
	}
	return out
}

func TestRouteModeOneEntryPerNodeAddressesLocal(t *testing.T) {
	e := newRouteEnv(t)
	p1, st1 := e.newRoutePool(smallNode, "node-1", podCIDR1)
	p2, _ := e.newRoutePool(routeNode2, "node-2", podCIDR2)
	// Both nodes start together: one create meets the other's Pending entry and is retried.
	var wg sync.WaitGroup
	for _, p := range []*RoutePool{p1, p2} {
		wg.Add(1)
		go func() { defer wg.Done(); e.start(p) }()
	}
	wg.Wait()
	defer p2.Stop()
	s := e.emu.Snapshot()
	want := map[string]string{podCIDR1.String(): smallNode, podCIDR2.String(): routeNode2}
	if got := routesOf(s); fmt.Sprint(got) != fmt.Sprint(want) || len(s.Routes) != 2 {
		t.Fatalf("route table = %+v, want exactly %v, Available", s.Routes, want)
	}
	if s.Calls["CreateRouteEntry"] < 2 {
		t.Fatalf("CreateRouteEntry called %d times", s.Calls["CreateRouteEntry"])
	}

	// 62 pods (a /26 less network and broadcast) concurrently: distinct, inside the CIDR, no
	// cloud call on the way.
	before := e.emu.Snapshot().Calls
	got := map[netip.Addr]PodKey{}
	var mu sync.Mutex
	for i := range 62 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			k := PodKey{Namespace: "default", Name: fmt.Sprintf("p%d", i), ContainerID: fmt.Sprintf("c%d", i)}
			a, err := p1.Allocate(context.Background(), k)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if prev, dup := got[a.IP]; dup {
				t.Errorf("%s given to %s and %s", a.IP, prev, k)
			}
			got[a.IP] = k
			if !podCIDR1.Contains(a.IP) || a.IP == podCIDR1.Addr() || a.IP == lastAddr(podCIDR1) {
				t.Errorf("%s is not a usable address of %s", a.IP, podCIDR1)
			}
			if !a.ENI.NodePrimary || a.ENI.PrimaryIP.IsValid() || a.ENI.Gateway != netip.MustParseAddr("192.168.1.253") {
				t.Errorf("allocation ENI = %+v: want the node's primary ENI, its gateway, no primary IP", a.ENI)
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	if _, err := p1.Allocate(context.Background(), PodKey{"default", "one-too-many", "cx"}); !errors.Is(err, ErrNodeFull) {
		t.Fatalf("63rd pod on a /26: %v, want ErrNodeFull", err)
	}
	if after := e.emu.Snapshot().Calls; fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("allocations called the cloud: %v → %v", before, after)
	}

	// A released address is not the next one handed out (reuse as late as possible).
	k0 := got[netip.MustParseAddr("192.168.128.1")]
	if err := p1.Release(context.Background(), k0); err != nil {
		t.Fatal(err)
	}
	if err := p1.Release(context.Background(), got[netip.MustParseAddr("192.168.128.30")]); err != nil {
		t.Fatal(err)
	}
	a, err := p1.Allocate(context.Background(), PodKey{"default", "new", "cnew"})
	if err != nil || a.IP != netip.MustParseAddr("192.168.128.1") {
		// Only .1 and .30 are free; the search starts after the last one handed out (.62),
		// wraps, and finds .1 first.
		t.Fatalf("after releasing .1 and .30: %v, %v", a.IP, err)
	}

	// Restart on the same store: the same allocations, no second entry.
	p1.Stop()
	if err := st1.Close(); err != nil {
		t.Fatal(err)
	}
	creates := e.emu.Snapshot().Calls["CreateRouteEntry"]
	p1b, _ := e.newRoutePool(smallNode, "node-1", podCIDR1)
	e.start(p1b)
	defer p1b.Stop()
	if n := len(p1b.Allocations()); n != 61 {
		t.Fatalf("%d allocations after restart, want 61", n)
	}
	if again, err := p1b.Allocate(context.Background(), PodKey{"default", "new", "cnew"}); err != nil || again.IP != a.IP {
		t.Fatalf("same key after restart: %v, %v; want %s", again.IP, err, a.IP)
	}
	s = e.emu.Snapshot()
	if s.Calls["CreateRouteEntry"] != creates || len(s.Routes) != 2 {
		t.Fatalf("restart created entries: %d → %d calls, table %+v", creates, s.Calls["CreateRouteEntry"], s.Routes)
	}

	// node-2 leaves: its entry goes, node-1's stays.
	table, _, _ := p1b.Route()
	deleted, err := DeleteDepartedRoutes(context.Background(), e.client(), table, clusterTag, map[string]bool{"node-1": true}, nil)
	if err != nil || len(deleted) != 1 || deleted[0].Destination != podCIDR2 {
		t.Fatalf("departed-route cleanup deleted %+v, %v; want only %s", deleted, err, podCIDR2)
	}
	e.emu.FinishTransitions()
	if got := routesOf(e.emu.Snapshot()); fmt.Sprint(got) != fmt.Sprint(map[string]string{podCIDR1.String(): smallNode}) {
		t.Fatalf("route table after node-2 left = %v", got)
	}
	if _, err := DeleteDepartedRoutes(context.Background(), e.client(), table, clusterTag, nil, nil); err == nil {
		t.Fatal("a nil live set was accepted")
	}
	// GC releases gone pods and puts back an entry someone deleted.
	if err := e.client().DeleteRouteEntry(context.Background(), table, s.Routes[0].ID); err != nil {
		t.Fatal(err)
	}
	e.emu.FinishTransitions()
	res, err := p1b.GC(context.Background(), func() map[string]bool { return map[string]bool{"default/new": true} })
	if err != nil || len(res.ReleasedAllocations) != 60 || len(p1b.Allocations()) != 1 {
		t.Fatalf("GC released %d (%v), %d left; want 60 released, 1 left", len(res.ReleasedAllocations), err, len(p1b.Allocations()))
	}
	if got := routesOf(e.emu.Snapshot()); got[podCIDR1.String()] != smallNode {
		t.Fatalf("GC did not restore node-1's entry: %v", got)
	}
}

// TestRouteModeCrashAfterCreateReplaysTheToken: the agent died after CreateRouteEntry reached
// the cloud and before it recorded the reply. The restart replays the create with the intent's
// token and ends with one entry, recorded, and no intent.
func TestRouteModeCrashAfterCreateReplaysTheToken(t *testing.T) {
	e := newRouteEnv(t)
	e.emu.SetDelays(ecsemu.TransitionDelays{Route: ecsemu.Duration(time.Hour)})
	p, st := e.newRoutePool(smallNode, "node-1", podCIDR1)
	table := e.emu.RouteTableID()
	// What the crashed run left: its intent, and the entry its call created (Pending).
	in := store.Intent{Token: "tern-crashed-create", Kind: store.IntentCreateRoute, Route: podCIDR1, RouteTableID: table, Created: time.Now()}
	if err := st.PutIntent(in); err != nil {
		t.Fatal(err)
	}
	id, err := e.client().CreateRouteEntry(context.Background(), aliyun.CreateRouteRequest{TableID: table, Destination: podCIDR1,
		InstanceID: smallNode, Name: RouteEntryName("node-1"), Description: RouteEntryDescription(clusterTag, "node-1"), Token: in.Token})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		done <- p.Start(ctx)
	}()
	// Start waits for Available; let the entry settle once the replay has been made.
	deadline := time.Now().Add(10 * time.Second)
	for e.emu.Snapshot().Calls["CreateRouteEntry"] < 2 {
		if time.Now().After(deadline) {
			t.Fatal("the restarted pool never replayed the create")
		}
		time.Sleep(time.Millisecond)
	}
	e.emu.FinishTransitions()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	defer p.Stop()
	s := e.emu.Snapshot()
	if len(s.Routes) != 1 || s.Routes[0].ID != id || s.Routes[0].Status != ecsemu.RouteStatusAvailable {
		t.Fatalf("route table = %+v, want the one entry %s, Available", s.Routes, id)
	}
	snap, err := st.Load()
	if err != nil || len(snap.Intents) != 0 || snap.Meta[metaRouteEntry] != id {
		t.Fatalf("store after replay: intents %+v, entry %q, %v; want none, %s", snap.Intents, snap.Meta[metaRouteEntry], err, id)
	}
}

func TestRouteModeRefusals(t *testing.T) {
	e := newRouteEnv(t)
	p1, _ := e.newRoutePool(smallNode, "node-1", podCIDR1)
	e.start(p1)
	defer p1.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Two nodes with one pod CIDR: the second refuses to start, naming the other instance.
	p2, _ := e.newRoutePool(routeNode2, "node-2", podCIDR1)
	if err := p2.Start(ctx); err == nil || !strings.Contains(err.Error(), smallNode) {
		t.Fatalf("second node on the same pod CIDR: %v, want a refusal naming %s", err, smallNode)
	}
	// A pod CIDR inside a vSwitch: the cloud refuses; the intent goes.
	p3, st3 := e.newRoutePool(routeNode2, "node-3", netip.MustParsePrefix("192.168.2.0/26"))
	if err := p3.Start(ctx); !errors.Is(err, aliyun.ErrBadRoute) {
		t.Fatalf("pod CIDR inside vsw-test-b: %v, want ErrBadRoute", err)
	}
	if snap, _ := st3.Load(); len(snap.Intents) != 0 {
		t.Fatalf("a refused create left intents %+v", snap.Intents)
	}
	if _, err := NewRoutePool(RouteOptions{}); err == nil || !strings.Contains(err.Error(), "podCIDR") {
		t.Fatalf("empty options: %v", err)
	}
}

// TestRouteModeStartsUnderFaults: 30 % Throttling/InternalError and latency on every call; both
// nodes still end with exactly their entries.
func TestRouteModeStartsUnderFaults(t *testing.T) {
	e := newRouteEnv(t)
	e.emu.SetLatency(10 * time.Millisecond)
	e.emu.InjectFault(ecsemu.Fault{Code: ecsemu.CodeThrottling, Rate: 0.15})
	e.emu.InjectFault(ecsemu.Fault{Code: ecsemu.CodeInternalError, Rate: 0.15})
	p1, _ := e.newRoutePool(smallNode, "node-1", podCIDR1)
	p2, _ := e.newRoutePool(routeNode2, "node-2", podCIDR2)
	var wg sync.WaitGroup
	for _, p := range []*RoutePool{p1, p2} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// The agent retries Start until it succeeds; so does this test (with a bound).
			for attempt := 1; ; attempt++ {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				err := p.Start(ctx)
				cancel()
				if err == nil {
					return
				}
				if attempt == 20 {
					t.Errorf("start still failing after %d attempts: %v", attempt, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	defer p1.Stop()
	defer p2.Stop()
	s := e.emu.Snapshot()
	if s.Errors[ecsemu.CodeThrottling]+s.Errors[ecsemu.CodeInternalError] == 0 {
		t.Fatal("no fault fired: the test exercised nothing")
	}
	want := map[string]string{podCIDR1.String(): smallNode, podCIDR2.String(): routeNode2}
	if got := routesOf(s); fmt.Sprint(got) != fmt.Sprint(want) || len(s.Routes) != 2 {
		t.Fatalf("route table under faults = %+v, want exactly %v", s.Routes, want)
	}
}

// TestRouteModeSurvivesListingLag: DescribeRouteEntryList lags 400 ms behind the table (a new
// entry missing, a deleted one still listed). Against it: two nodes start together, each on
// its first attempt; a node that crashed after it recorded a create's reply but before the
// listing showed the entry adopts it on restart (its new create's InvalidCIDRBlock.Duplicate
// sends it to the listing) instead of failing; one that crashed with the reply lost, after
// its previous entry was deleted, replays the token and records the new entry, not the old
// one the listing still shows; a departed node's entry is deleted, the clean-up repeated
// while the listing still shows it is harmless, and a node given the departed node's CIDR at
// once starts on its first attempt although the listing still shows the old entry. Every
// step ends with exactly one entry per node.
func TestRouteModeSurvivesListingLag(t *testing.T) {
	const lag = 400 * time.Millisecond
	const node3, node4 = "i-test-0003", "i-test-0004"
	podCIDR3 := netip.MustParsePrefix("192.168.130.0/26")
	cfg := ecsemu.TestConfig()
	cfg.AddInstance(routeNode2, "ecs.g7.large", "vsw-test-a", "192.168.1.12")
	cfg.AddInstance(node3, "ecs.g7.large", "vsw-test-a", "192.168.1.13")
	cfg.AddInstance(node4, "ecs.g7.large", "vsw-test-a", "192.168.1.14")
	cfg.ListingLag = ecsemu.ListingLag{Routes: ecsemu.Duration(lag)}
	emu, ep := ecsemu.NewTestServer(t, cfg)
	emu.SetDelays(ecsemu.TransitionDelays{Route: ecsemu.Duration(40 * time.Millisecond), RouteDelete: ecsemu.Duration(10 * time.Millisecond)})
	e := &routeEnv{env: &env{t: t, emu: emu, endpoint: ep}, dir: t.TempDir()}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	table := emu.RouteTableID()
	wantTable := func(what string, want map[string]string) {
		t.Helper()
		s := e.emu.Snapshot()
		if got := routesOf(s); fmt.Sprint(got) != fmt.Sprint(want) || len(s.Routes) != len(want) {
			t.Fatalf("%s: route table %+v, want exactly %v, Available", what, s.Routes, want)
		}
	}
	wantRecorded := func(what string, p *RoutePool, st *store.Store, id string) {
		t.Helper()
		snap, err := st.Load()
		if err != nil || len(snap.Intents) != 0 || snap.Meta[metaRouteEntry] != id {
			t.Fatalf("%s: store has intents %+v, entry %q (%v); want none, %s", what, snap.Intents, snap.Meta[metaRouteEntry], err, id)
		}
		if _, entry, _ := p.Route(); entry != id {
			t.Fatalf("%s: the pool's entry is %q, want %s", what, entry, id)
		}
	}
	createFor := func(instance, node string, cidr netip.Prefix, token string) string {
		t.Helper()
		id, err := e.client().CreateRouteEntry(ctx, aliyun.CreateRouteRequest{TableID: table, Destination: cidr, InstanceID: instance,
			Name: RouteEntryName(node), Description: RouteEntryDescription(clusterTag, node), Token: token})
		if err != nil {
			t.Fatal(err)
		}
		return id
	}

	p1, _ := e.newRoutePool(smallNode, "node-1", podCIDR1)
	p2, _ := e.newRoutePool(routeNode2, "node-2", podCIDR2)
	var wg sync.WaitGroup
	for _, p := range []*RoutePool{p1, p2} {
		wg.Add(1)
		go func() { defer wg.Done(); e.start(p) }()
	}
	wg.Wait()
	defer p1.Stop()
	wantTable("two nodes started", map[string]string{podCIDR1.String(): smallNode, podCIDR2.String(): routeNode2})

	// node-3's first run created its entry, recorded the reply and was killed before the
	// listing showed the entry.
	_, st3 := e.newRoutePool(node3, "node-3", podCIDR3)
	first := createFor(node3, "node-3", podCIDR3, "tern-recorded-create")
	if err := st3.Update(func(tx *store.Tx) error {
		return errors.Join(tx.SetMeta(metaRouteEntry, first), tx.SetMeta(metaRouteCIDR, podCIDR3.String()), tx.SetMeta(metaRouteTable, table))
	}); err != nil {
		t.Fatal(err)
	}
	if err := st3.Close(); err != nil {
		t.Fatal(err)
	}
	p3, st3 := e.newRoutePool(node3, "node-3", podCIDR3)
	e.start(p3)
	all := map[string]string{podCIDR1.String(): smallNode, podCIDR2.String(): routeNode2, podCIDR3.String(): node3}
	wantTable("restart after a recorded create not listed yet", all)
	wantRecorded("restart after a recorded create not listed yet", p3, st3, first)

	// Someone deletes node-3's entry; its check creates it again and the agent is killed with
	// that create's reply lost; the listing still shows the deleted entry.
	p3.Stop()
	if err := e.emu.DeleteRouteEntryNow(first); err != nil {
		t.Fatal(err)
	}
	lost := store.Intent{Token: "tern-lost-reply", Kind: store.IntentCreateRoute, Route: podCIDR3, RouteTableID: table, Created: time.Now()}
	if err := st3.PutIntent(lost); err != nil {
		t.Fatal(err)
	}
	second := createFor(node3, "node-3", podCIDR3, lost.Token)
	if err := st3.Close(); err != nil {
		t.Fatal(err)
	}
	p3, st3 = e.newRoutePool(node3, "node-3", podCIDR3)
	e.start(p3)
	defer p3.Stop()
	wantTable("restart after a lost reply, the old entry still listed", all)
	wantRecorded("restart after a lost reply, the old entry still listed", p3, st3, second)

	// node-2 leaves. The clean-up deletes its entry; run again at once, while the listing
	// still shows the entry, it does no harm.
	p2.Stop()
	for i := range 2 {
		if _, err := DeleteDepartedRoutes(ctx, e.client(), table, clusterTag, map[string]bool{"node-1": true, "node-3": true}, nil); err != nil {
			t.Fatalf("clean-up %d of node-2's entry: %v", i+1, err)
		}
	}
	e.emu.FinishTransitions()
	wantTable("node-2 left", map[string]string{podCIDR1.String(): smallNode, podCIDR3.String(): node3})
	if listed := e.emu.ListedRoutes(); !slices.ContainsFunc(listed, func(r ecsemu.RouteEntryState) bool { return r.NextHopID == routeNode2 }) {
		t.Fatalf("the listing shows %+v; the test wants it still to show node-2's deleted entry", listed)
	}
	// node-4 gets node-2's CIDR and starts while the listing still shows node-2's entry.
	p4, _ := e.newRoutePool(node4, "node-4", podCIDR2)
	e.start(p4)
	defer p4.Stop()
	wantTable("node-4 took node-2's CIDR", map[string]string{podCIDR1.String(): smallNode, podCIDR2.String(): node4, podCIDR3.String(): node3})
}
