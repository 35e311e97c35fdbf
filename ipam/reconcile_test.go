package ipam

import (
	"context"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/test/ecsemu"
)

// TestReconcileKeepsAllocationsAndReplaysIntentsWhileTheListingLags scripts the listing with
// the emulator's clock: right after a crash the listing lacks every address the pool holds
// (missing), later it shows them (present). Reconcile must keep every allocation, replay the
// assign whose reply was lost (with its token: the cloud's exact addresses, none assigned
// twice), drop nothing before ListingGrace has passed, and after it drop only what the cloud
// really lacks.
func TestReconcileKeepsAllocationsAndReplaysIntentsWhileTheListingLags(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	e := newEnv(t, ecsemu.WithClock(clock.Now))
	e.emu.SetListingLag(ecsemu.ListingLag{Assigned: ecsemu.Duration(5 * time.Second), Unassigned: ecsemu.Duration(5 * time.Second)})
	e.grace, e.now = 10*time.Second, clock.Now
	cfg := eniConf(t, 0, 3, "vsw-test-a")

	p1, st1 := e.startPool(bigNode, cfg)
	before := allocateAll(t, p1, 0, 3)

	// The next growth is an assign; its reply is held back and lost to the "crash".
	held, release := e.emu.HoldReply("AssignPrivateIpAddresses", nil)
	defer release()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i := 3; i < 12; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if a, err := p1.Allocate(ctx, podKey(i)); err == nil { // idle ones, before the assign
				mu.Lock()
				before[podKey(i)] = a
				mu.Unlock()
			}
		}()
	}
	var call ecsemu.HeldCall
	select {
	case call = <-held:
	case <-time.After(20 * time.Second):
		t.Fatal("no assign was made")
	}
	cancel()
	p1.cancel()
	wg.Wait()
	p1.wg.Wait()
	if err := st1.Close(); err != nil {
		t.Fatal(err)
	}
	snap1 := e.emu.Snapshot()
	onENI, _ := snap1.ENI(call.ENIID)

	// The listing lacks every secondary address (the clock has not moved).
	listed, err := e.client().ListENIs(context.Background(), aliyun.ENIFilter{IDs: []string{call.ENIID}})
	if err != nil || len(listed) != 1 || len(listed[0].Secondary) != 0 {
		t.Fatalf("listing right after the crash = %+v, %v; want the ENI without addresses", listed, err)
	}

	p2, st2 := e.startPool(bigNode, cfg)
	defer st2.Close()
	defer p2.Stop()
	after := p2.Allocations()
	for k, a := range before {
		if after[k].IP != a.IP {
			t.Errorf("%s had %s before the restart, %v after", k, a.IP, after[k].IP)
		}
	}
	if len(after) != len(before) {
		t.Errorf("%d allocations after the restart, want %d", len(after), len(before))
	}
	snap, err := st2.Load()
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Intents) != 0 {
		t.Errorf("intents left after reconcile: %+v", snap.Intents)
	}
	// The replay answered with the held call's addresses and assigned nothing more.
	if now, _ := e.emu.Snapshot().ENI(call.ENIID); len(now.IPs) != len(onENI.IPs) {
		t.Errorf("ENI %s had %d addresses at the crash, %d after the replay: the replay assigned again", call.ENIID, len(onENI.IPs), len(now.IPs))
	}
	known := map[string]bool{}
	for _, es := range p2.Status().ENIs {
		for _, ip := range es.IPs {
			known[ip.String()] = true
		}
	}
	for _, ip := range onENI.IPs { // the primary serves pods too: the pool must hold it
		if !known[ip] {
			t.Errorf("%s (assigned by the lost call or before) is unknown to the pool after the replay", ip)
		}
	}
	p2.mu.Lock()
	suspects := len(p2.suspects)
	p2.mu.Unlock()
	if suspects == 0 {
		t.Error("the pool noted no disagreement with a listing that lacks every address")
	}

	live := map[string]bool{}
	for k := range before {
		live[k.Namespace+"/"+k.Name] = true
	}
	gc := func() GCResult {
		t.Helper()
		res, err := p2.GC(context.Background(), func() map[string]bool { return live })
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	// Still missing, within the grace: nothing is dropped, and the pool keeps serving.
	clock.Advance(2 * time.Second)
	if res := gc(); len(res.DroppedIPs) != 0 {
		t.Fatalf("GC dropped %v within the listing grace", res.DroppedIPs)
	}
	if _, err := p2.Allocate(context.Background(), podKey(50)); err != nil {
		t.Fatalf("allocate while the listing lags: %v", err)
	}
	live["default/pod-50"] = true

	// Present: the listing caught up; the disagreement is forgotten, nothing dropped.
	clock.Advance(10 * time.Second)
	if res := gc(); len(res.DroppedIPs)+len(res.AdoptedIPs) != 0 {
		t.Fatalf("GC after the listing caught up dropped %v, adopted %v", res.DroppedIPs, res.AdoptedIPs)
	}
	p2.mu.Lock()
	suspects = len(p2.suspects)
	p2.mu.Unlock()
	if suspects != 0 {
		t.Errorf("%d disagreements remain after the listing caught up", suspects)
	}
	for k, a := range before {
		if got := p2.Allocations()[k]; got.IP != a.IP {
			t.Errorf("%s lost %s", k, a.IP)
		}
	}

	// An address that really left (unassigned behind the pool's back) is dropped, but only
	// once a listing ListingGrace after the first still lacks it.
	var idle netip.Addr
	for _, es := range p2.Status().ENIs {
		for _, ip := range es.IPs {
			if !slices.Contains(es.InUse, ip) {
				idle = ip
			}
		}
	}
	if !idle.IsValid() {
		t.Fatal("no idle address to take away")
	}
	if err := e.client().UnassignPrivateIPs(context.Background(), call.ENIID, []netip.Addr{idle}); err != nil {
		t.Fatal(err)
	}
	clock.Advance(6 * time.Second) // past the unassign lag: the listing lacks it
	if res := gc(); len(res.DroppedIPs) != 0 {
		t.Fatalf("first sight of the missing %s dropped %v", idle, res.DroppedIPs)
	}
	clock.Advance(10 * time.Second)
	if res := gc(); !slices.Equal(res.DroppedIPs, []netip.Addr{idle}) {
		t.Fatalf("after the grace GC dropped %v, want [%s]", res.DroppedIPs, idle)
	}
	assertNoLeak(t, p2, e.emu, st2, bigNode)
}
