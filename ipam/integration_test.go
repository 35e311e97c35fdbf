package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/credential"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/store"
	"github.com/tern-net/tern/test/ecsemu"
)

// These tests drive the pool through the real Alibaba Cloud SDK against the ECS/VPC emulator on
// 127.0.0.1 (no SDN, nothing routed).

const (
	zone       = "cn-hangzhou-h"
	bigNode    = "i-big-0001"  // ecs.g7.4xlarge: 7 ENIs × 20 = 140 pods
	smallNode  = "i-test-0001" // ecs.g7.large: 2 ENIs × 6 = 12 pods
	tinyVSw    = "vsw-tiny"    // a /29: 4 usable addresses
	nodeName   = "node-1"
	clusterTag = "cluster-test"
)

type env struct {
	t        *testing.T
	emu      *ecsemu.Emulator
	endpoint string
	dbPath   string
	grace    time.Duration // the pools' ListingGrace (0: the default)
	now      func() time.Time
	livePods LivePodsFunc // the pools' Options.LivePods
}

func newEnv(t *testing.T, opts ...ecsemu.Option) *env {
	t.Helper()
	cfg := ecsemu.TestConfig()
	cfg.VSwitches = append(cfg.VSwitches, ecsemu.VSwitchConfig{ID: tinyVSw, Zone: zone, CIDR: "192.168.3.0/29"})
	cfg.AddInstance(bigNode, "ecs.g7.4xlarge", "vsw-test-a", "192.168.1.11")
	emu, ep := ecsemu.NewTestServer(t, cfg, opts...)
	return &env{t: t, emu: emu, endpoint: ep, dbPath: filepath.Join(t.TempDir(), "ipam.db")}
}

func (e *env) client() *aliyun.Client {
	e.t.Helper()
	fast := aliyun.RateLimit{PerSecond: 1000, Burst: 1000}
	limits := map[string]aliyun.RateLimit{}
	for k := range aliyun.DefaultRateLimits() {
		limits[k] = fast
	}
	c, err := aliyun.New(aliyun.Options{
		RegionID:     ecsemu.TestRegion,
		Credential:   credential.Credential{AccessKeyID: ecsemu.TestAccessKeyID, AccessKeySecret: ecsemu.TestAccessKeySecret},
		Endpoint:     e.endpoint,
		PollInterval: 5 * time.Millisecond,
		WaitTimeout:  10 * time.Second,
		Backoff:      aliyun.Backoff{Initial: 5 * time.Millisecond, Max: 100 * time.Millisecond, Multiplier: 2, Jitter: 0.5, MaxAttempts: 10},
		RateLimits:   limits,
		Logger:       zaptest.NewLogger(e.t).Named("cloud"),
	})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(c.Close)
	return c
}

func eniConf(t *testing.T, minPool, maxPool int, vswitches ...string) eniconfig.Config {
	t.Helper()
	doc := fmt.Sprintf(`{"vswitches":{%q:%s},"security_group":"sg-test","min_pool_size":%d,"max_pool_size":%d,"vswitch_selection_policy":"ordered"}`,
		zone, jsonList(vswitches), minPool, maxPool)
	c, _, err := eniconfig.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func jsonList(s []string) string {
	out := "["
	for i, v := range s {
		if i > 0 {
			out += ","
		}
		out += fmt.Sprintf("%q", v)
	}
	return out + "]"
}

// startPool opens the store and starts a pool on instance.
func (e *env) startPool(instance string, cfg eniconfig.Config) (*Pool, *store.Store) {
	e.t.Helper()
	st, err := store.Open(e.dbPath, time.Second)
	if err != nil {
		e.t.Fatal(err)
	}
	p, err := New(Options{
		Cloud: e.client(), Store: st, Config: cfg, InstanceID: instance, NodeName: nodeName, ClusterID: clusterTag,
		Logger: zaptest.NewLogger(e.t).Named("pool"), AllocateWait: 20 * time.Second,
		BatchWindow: 20 * time.Millisecond, MaintainInterval: time.Hour, ListingGrace: e.grace, Now: e.now,
		LivePods: e.livePods,
	})
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.Start(ctx); err != nil {
		e.t.Fatal(err)
	}
	return p, st
}

func podKey(i int) PodKey {
	return PodKey{Namespace: "default", Name: fmt.Sprintf("pod-%d", i), ContainerID: fmt.Sprintf("c%04d", i)}
}

// allocateAll runs n concurrent Allocate calls, retrying ErrPoolEmptyTryAgain like the CNI.
func allocateAll(t *testing.T, p *Pool, from, n int) map[PodKey]Allocation {
	t.Helper()
	var mu sync.Mutex
	out := map[PodKey]Allocation{}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := from; i < from+n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			k := podKey(i)
			for attempt := 0; ; attempt++ {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				a, err := p.Allocate(ctx, k)
				cancel()
				if errors.Is(err, ErrPoolEmptyTryAgain) && attempt < 20 {
					continue
				}
				if err != nil {
					errs <- fmt.Errorf("allocate %s: %w", k, err)
					return
				}
				mu.Lock()
				out[k] = a
				mu.Unlock()
				return
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	return out
}

func totalCalls(s ecsemu.State) int {
	n := 0
	for _, c := range s.Calls {
		n += c
	}
	return n
}

// ourENIs returns the emulator's ENIs tagged for our node, by ID.
func ourENIs(s ecsemu.State) map[string]ecsemu.ENIState {
	out := map[string]ecsemu.ENIState{}
	for _, e := range s.ENIs {
		if e.Tags[TagCreator] == TagCreatorTern && e.Tags[TagNode] == nodeName {
			out[e.ID] = e
		}
	}
	return out
}

// assertNoLeak compares the cloud with the store: the same ENIs, all attached to instance, the
// same secondary addresses, and every allocation on an address its ENI has. A background
// refill or reclaim pass may still be running when the test gets here, so the comparison
// is repeated (each time with the pool's operations held off) until it holds or 10 s pass.
func assertNoLeak(t *testing.T, p *Pool, emu *ecsemu.Emulator, st *store.Store, instance string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		probs := leaks(t, p, emu, st, instance)
		if len(probs) == 0 {
			return
		}
		if time.Now().After(deadline) {
			for _, pr := range probs {
				t.Error(pr)
			}
			t.FailNow()
		}
		time.Sleep(p.opts.BatchWindow)
	}
}

// leaks lists what assertNoLeak finds wrong, compared while the pool's operations wait.
func leaks(t *testing.T, p *Pool, emu *ecsemu.Emulator, st *store.Store, instance string) []string {
	t.Helper()
	var probs []string
	p.opMu.Lock()
	defer p.opMu.Unlock()
	cloud := ourENIs(emu.Snapshot())
	snap, err := st.Load()
	if err != nil {
		t.Fatal(err)
	}
	stored := map[string]store.ENI{}
	for _, e := range snap.ENIs {
		stored[e.ID] = e
	}
	for id, ce := range cloud {
		if ce.Status != aliyun.StatusInUse || ce.InstanceID != instance {
			probs = append(probs, fmt.Sprintf("cloud ENI %s is %s on %q: leaked (not attached to %s)", id, ce.Status, ce.InstanceID, instance))
		}
		se, ok := stored[id]
		if !ok {
			probs = append(probs, fmt.Sprintf("cloud ENI %s (%d IPs) is not in the store: leaked", id, len(ce.IPs)-1))
			continue
		}
		var want []string
		for _, ip := range ce.IPs[1:] {
			want = append(want, ip)
		}
		var got []string
		for _, ip := range se.IPs {
			got = append(got, ip.String())
		}
		sort.Strings(want)
		sort.Strings(got)
		if fmt.Sprint(want) != fmt.Sprint(got) {
			probs = append(probs, fmt.Sprintf("ENI %s: cloud has secondary IPs %v, store has %v", id, want, got))
		}
	}
	for id := range stored {
		if _, ok := cloud[id]; !ok {
			probs = append(probs, fmt.Sprintf("store ENI %s does not exist in the cloud", id))
		}
	}
	seen := map[netip.Addr]string{}
	for _, a := range snap.Allocations {
		if prev, dup := seen[a.IP]; dup {
			probs = append(probs, fmt.Sprintf("IP %s allocated twice: %s and %s", a.IP, prev, a.Key()))
		}
		seen[a.IP] = a.Key()
		se, ok := stored[a.ENIID]
		found := ok && se.PrimaryIP == a.IP // an ENI's primary serves a pod too
		for _, ip := range se.IPs {
			found = found || ip == a.IP
		}
		if !ok || !found {
			probs = append(probs, fmt.Sprintf("allocation %s: IP %s not on ENI %s", a.Key(), a.IP, a.ENIID))
		}
	}
	if len(snap.Intents) != 0 {
		probs = append(probs, fmt.Sprintf("intents left behind: %+v", snap.Intents))
	}
	return probs
}

func TestBurstOf30DistinctBatchedAndVisibleInCloud(t *testing.T) {
	e := newEnv(t)
	p, st := e.startPool(bigNode, eniConf(t, 0, 5, "vsw-test-a"))
	defer st.Close()
	defer p.Stop()

	before := totalCalls(e.emu.Snapshot())
	allocs := allocateAll(t, p, 0, 30)
	after := e.emu.Snapshot()
	calls := totalCalls(after) - before

	ips := map[netip.Addr]PodKey{}
	for k, a := range allocs {
		if prev, dup := ips[a.IP]; dup {
			t.Fatalf("IP %s given to %s and %s", a.IP, prev, k)
		}
		ips[a.IP] = k
	}
	cloud := ourENIs(after)
	for k, a := range allocs {
		ce, ok := cloud[a.ENI.ID]
		if !ok {
			t.Fatalf("%s: ENI %s not found in the cloud with our tags", k, a.ENI.ID)
		}
		if ce.InstanceID != bigNode || ce.Status != aliyun.StatusInUse {
			t.Errorf("%s: ENI %s is %s on %q", k, ce.ID, ce.Status, ce.InstanceID)
		}
		onENI := false
		for _, ip := range ce.IPs { // the ENI's primary (IPs[0]) serves a pod too
			onENI = onENI || ip == a.IP.String()
		}
		if !onENI {
			t.Errorf("%s: IP %s is not an IP of ENI %s (%v)", k, a.IP, ce.ID, ce.IPs)
		}
		vs, _ := after.VSwitch(ce.VSwitchID)
		if a.ENI.MAC != ce.MAC || a.ENI.PrimaryIP.String() != ce.PrimaryIP || a.ENI.Gateway.String() != vs.Gateway || a.ENI.VSwitchCIDR.String() != vs.CIDR {
			t.Errorf("%s: ENI info %+v does not match the cloud (mac %s primary %s gw %s cidr %s)", k, a.ENI, ce.MAC, ce.PrimaryIP, vs.Gateway, vs.CIDR)
		}
	}

	perIP := float64(calls) / 30
	t.Logf("%d API calls for 30 IPs (%.2f per IP): %v", calls, perIP, after.Calls)
	if perIP >= 0.5 {
		t.Errorf("%.2f API calls per IP; batching should keep it below 0.5", perIP)
	}

	// Idempotent per container id: the same key gets the same address, with no cloud call.
	again, err := p.Allocate(context.Background(), podKey(7))
	if err != nil || again.IP != allocs[podKey(7)].IP {
		t.Errorf("second Allocate of pod-7 = %v, %v; want %v", again.IP, err, allocs[podKey(7)].IP)
	}
	// A new sandbox of the same pod is a different allocation.
	k2 := podKey(7)
	k2.ContainerID = "other"
	other, err := p.Allocate(context.Background(), k2)
	if err != nil || other.IP == again.IP {
		t.Errorf("new sandbox of pod-7 got %v, %v; want a different address", other.IP, err)
	}

	ann := p.AllocatedENIIPs()
	n := 0
	for _, ips := range ann {
		n += len(ips)
	}
	if n != 31 {
		t.Errorf("annotation lists %d IPs in use, want 31: %v", n, ann)
	}
	if c := p.Capacity(); c.MaxPods != 140 {
		t.Errorf("capacity %+v, want 140 pods for ecs.g7.4xlarge", c)
	}
	assertNoLeak(t, p, e.emu, st, bigNode)
}

func TestPoolStaysWithinMinMaxAndDeletesEmptyENIs(t *testing.T) {
	e := newEnv(t)
	const minPool, maxPool = 2, 3
	p, st := e.startPool(smallNode, eniConf(t, minPool, maxPool, "vsw-test-a"))
	defer st.Close()
	defer p.Stop()

	if s := p.Status(); s.Idle != minPool {
		t.Fatalf("after warm-up idle = %d, want min_pool_size %d", s.Idle, minPool)
	}
	// Fill the node: ecs.g7.large holds 12 pod IPs on 2 secondary ENIs, each ENI's primary
	// address included (the planning table's (3 − 1) × 6).
	allocs := allocateAll(t, p, 0, 12)
	cloudNow := ourENIs(e.emu.Snapshot())
	if len(cloudNow) != 2 {
		t.Fatalf("want 2 ENIs for 12 pods, cloud has %d", len(cloudNow))
	}
	primaries := 0
	for _, a := range allocs {
		if a.IP == a.ENI.PrimaryIP {
			primaries++
		}
	}
	if primaries != 2 {
		t.Errorf("%d pods got an ENI's primary address, want 2 (one per secondary ENI)", primaries)
	}
	// A 13th pod does not fit.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	_, err := p.Allocate(ctx, podKey(99))
	cancel()
	if !errors.Is(err, ErrNodeFull) {
		t.Fatalf("13th allocation on ecs.g7.large: err = %v, want ErrNodeFull", err)
	}

	for k := range allocs {
		if err := p.Release(context.Background(), k); err != nil {
			t.Fatal(err)
		}
		if err := p.Release(context.Background(), k); err != nil { // idempotent
			t.Fatal(err)
		}
	}
	p.opMu.Lock()
	p.reclaim(context.Background())
	p.fill(context.Background())
	p.opMu.Unlock()

	s := p.Status()
	if s.InUse != 0 || s.Idle < minPool || s.Idle > maxPool {
		t.Fatalf("after releasing all: idle %d in use %d; want idle within [%d,%d]", s.Idle, s.InUse, minPool, maxPool)
	}
	cloud := ourENIs(e.emu.Snapshot())
	if len(cloud) != 1 {
		t.Errorf("after releasing all, %d ENIs remain in the cloud; the emptied one should be deleted", len(cloud))
	}
	cloudIPs := 0
	for _, ce := range cloud {
		cloudIPs += len(ce.IPs) // the primary is idle in the pool too
	}
	if cloudIPs != s.Idle {
		t.Errorf("cloud holds %d IPs on our ENIs, pool has %d idle", cloudIPs, s.Idle)
	}
	assertNoLeak(t, p, e.emu, st, smallNode)
}

func TestFaultsAndLatencyStillAllocateWithoutLeak(t *testing.T) {
	e := newEnv(t, ecsemu.WithSeed(42))
	p, st := e.startPool(bigNode, eniConf(t, 0, 5, "vsw-test-a"))
	defer st.Close()
	defer p.Stop()

	e.emu.SetLatency(50 * time.Millisecond)
	e.emu.InjectFault(ecsemu.Fault{Code: ecsemu.CodeThrottling, Rate: 0.15})
	e.emu.InjectFault(ecsemu.Fault{Code: ecsemu.CodeInternalError, Rate: 0.18})

	allocs := allocateAll(t, p, 0, 30)
	seen := map[netip.Addr]bool{}
	for k, a := range allocs {
		if seen[a.IP] {
			t.Fatalf("duplicate IP %s (%s)", a.IP, k)
		}
		seen[a.IP] = true
	}
	// Release a third under faults too, then let the pool trim itself.
	i := 0
	for k := range allocs {
		if i%3 == 0 {
			if err := p.Release(context.Background(), k); err != nil {
				t.Fatal(err)
			}
		}
		i++
	}
	p.opMu.Lock()
	p.reclaim(context.Background())
	p.opMu.Unlock()

	snap := e.emu.Snapshot()
	t.Logf("calls %v errors %v", snap.Calls, snap.Errors)
	if snap.Errors[ecsemu.CodeThrottling]+snap.Errors[ecsemu.CodeInternalError] < 3 {
		t.Fatalf("faults barely fired (%v): the test proves nothing", snap.Errors)
	}
	e.emu.ClearFaults()
	e.emu.SetLatency(0)
	assertNoLeak(t, p, e.emu, st, bigNode)
}

func TestVSwitchExhaustionThenRecoveryByUpdateConfig(t *testing.T) {
	e := newEnv(t)
	p, st := e.startPool(bigNode, eniConf(t, 0, 5, tinyVSw))
	defer st.Close()
	defer p.Stop()

	// vsw-tiny has 4 usable addresses: an ENI's primary and 3 secondaries, all for pods.
	allocs := allocateAll(t, p, 0, 4)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	_, err := p.Allocate(ctx, podKey(4))
	cancel()
	var ve *VSwitchExhaustedError
	if !errors.Is(err, ErrVSwitchExhausted) || !errors.As(err, &ve) || len(ve.VSwitchIDs) != 1 || ve.VSwitchIDs[0] != tinyVSw {
		t.Fatalf("5th allocation: err = %v, want a VSwitchExhaustedError naming %s", err, tinyVSw)
	}

	p.UpdateConfig(eniConf(t, 0, 5, tinyVSw, "vsw-test-b"))
	a, err := p.Allocate(context.Background(), podKey(4))
	if err != nil {
		t.Fatalf("after adding vsw-test-b: %v", err)
	}
	if a.ENI.VSwitchID != "vsw-test-b" || !netip.MustParsePrefix("192.168.2.0/24").Contains(a.IP) {
		t.Errorf("allocation after recovery = %+v, want an address of vsw-test-b", a)
	}
	for _, old := range allocs {
		if old.IP == a.IP {
			t.Errorf("recovered allocation reused %s", a.IP)
		}
	}
	assertNoLeak(t, p, e.emu, st, bigNode)
}

func TestRestartKeepsAllocationsAndNeverGivesAnIPTwice(t *testing.T) {
	e := newEnv(t)
	cfg := eniConf(t, 1, 5, "vsw-test-a")
	p1, st1 := e.startPool(bigNode, cfg)
	first := allocateAll(t, p1, 0, 12)
	p1.Stop()
	if err := st1.Close(); err != nil {
		t.Fatal(err)
	}

	p2, st2 := e.startPool(bigNode, cfg)
	defer st2.Close()
	defer p2.Stop()
	got := p2.Allocations()
	if len(got) != len(first) {
		t.Fatalf("after restart %d allocations, want %d", len(got), len(first))
	}
	for k, a := range first {
		if got[k].IP != a.IP || got[k].ENI != a.ENI {
			t.Errorf("%s: after restart %+v, before %+v", k, got[k], a)
		}
		again, err := p2.Allocate(context.Background(), k)
		if err != nil || again.IP != a.IP {
			t.Errorf("%s: Allocate after restart = %v, %v; want %v", k, again.IP, err, a.IP)
		}
	}
	second := allocateAll(t, p2, 100, 12)
	used := map[netip.Addr]bool{}
	for _, a := range first {
		used[a.IP] = true
	}
	for k, a := range second {
		if used[a.IP] {
			t.Errorf("%s got %s, which a pod from before the restart holds", k, a.IP)
		}
		used[a.IP] = true
	}

	// GC releases exactly the allocations whose pods are gone.
	live := map[string]bool{}
	for k := range second {
		live[k.Namespace+"/"+k.Name] = true
	}
	gone := map[PodKey]bool{}
	for k := range first {
		if len(gone) < 6 {
			gone[k] = true
		} else {
			live[k.Namespace+"/"+k.Name] = true
		}
	}
	res, err := p2.GC(context.Background(), func() map[string]bool { return live })
	if err != nil {
		t.Fatal(err)
	}
	if len(res.ReleasedAllocations) != 6 {
		t.Errorf("GC released %v, want the 6 gone pods", res.ReleasedAllocations)
	}
	for _, k := range res.ReleasedAllocations {
		if !gone[k] {
			t.Errorf("GC released live pod %s", k)
		}
	}
	if n := len(p2.Allocations()); n != 18 {
		t.Errorf("%d allocations after GC, want 18", n)
	}
	if _, err := p2.GC(context.Background(), func() map[string]bool { return nil }); err == nil {
		t.Error("GC with a nil live set did not refuse")
	}
	assertNoLeak(t, p2, e.emu, st2, bigNode)
}

func TestCrashMidBurstLeavesNothingLeaked(t *testing.T) {
	for _, kind := range []string{store.IntentAssignIPs, store.IntentCreateENI} {
		t.Run("during "+kind, func(t *testing.T) { crashMidBurst(t, kind) })
	}
}

// crashMidBurst abandons a pool in the middle of a burst while an operation of the given intent
// kind is in flight, then restarts from the same state file and checks nothing leaked.
func crashMidBurst(t *testing.T, crashDuring string) {
	e := newEnv(t)
	cfg := eniConf(t, 0, 5, "vsw-test-a")
	// Slow transitions and calls so the crash lands in the middle of creating and attaching,
	// and a listing that lags behind them as the real one may.
	e.emu.SetDelays(ecsemu.TransitionDelays{Attach: ecsemu.Duration(80 * time.Millisecond), Detach: ecsemu.Duration(20 * time.Millisecond)})
	e.emu.SetLatency(15 * time.Millisecond)
	e.emu.SetListingLag(ecsemu.ListingLag{Assigned: ecsemu.Duration(500 * time.Millisecond), Unassigned: ecsemu.Duration(time.Second),
		Status: ecsemu.Duration(100 * time.Millisecond)})
	e.grace = 1500 * time.Millisecond

	p1, st1 := e.startPool(bigNode, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	var mu sync.Mutex
	returned := map[PodKey]Allocation{}
	var wg sync.WaitGroup
	for i := range 45 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a, err := p1.Allocate(ctx, podKey(i))
			if err == nil {
				mu.Lock()
				returned[podKey(i)] = a
				mu.Unlock()
			}
		}()
		if i == 25 {
			time.Sleep(30 * time.Millisecond)
		}
	}
	// Crash once some pods have addresses and more are in flight: cancel everything, no
	// cleanup, close the database under the abandoned pool.
	// Wait until pods hold addresses and a cloud operation is in flight (an intent is recorded).
	deadline := time.Now().Add(10 * time.Second)
	var inFlight []store.Intent
	for {
		mu.Lock()
		n := len(returned)
		mu.Unlock()
		snap, err := st1.Load()
		if err != nil {
			t.Fatal(err)
		}
		inFlight = snap.Intents
		hit := false
		for _, in := range inFlight {
			hit = hit || in.Kind == crashDuring
		}
		if n >= 5 && hit {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no crash point reached: %d allocations, intents %+v", n, inFlight)
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	p1.cancel()
	if err := st1.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	p1.wg.Wait() // only so the abandoned pool does not log after the test ends
	waitQuiet(t, e.emu)
	mu.Lock()
	t.Logf("crashed with %d allocations returned and intents in flight: %+v", len(returned), inFlight)
	mu.Unlock()

	p2, st2 := e.startPool(bigNode, cfg)
	defer st2.Close()
	defer p2.Stop()
	live := map[string]bool{}
	for k := range returned {
		live[k.Namespace+"/"+k.Name] = true
	}
	res, err := p2.GC(context.Background(), func() map[string]bool { return live })
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("GC: %+v", res)

	// Every address handed out before the crash survives it, unchanged.
	got := p2.Allocations()
	for k, a := range returned {
		if got[k].IP != a.IP {
			t.Errorf("%s had %s before the crash, %v after", k, a.IP, got[k].IP)
		}
	}
	for k := range got {
		if _, ok := returned[k]; !ok {
			t.Errorf("%s is allocated after GC but its pod never got the address", k)
		}
	}
	// Every address the cloud gives our ENIs is known to the pool (idle or in use).
	known := map[string]bool{}
	for _, es := range p2.Status().ENIs {
		for _, ip := range es.IPs {
			known[ip.String()] = true
		}
	}
	for id, ce := range ourENIs(e.emu.Snapshot()) {
		for _, ip := range ce.IPs { // the primary included: it serves pods too
			if !known[ip] {
				t.Errorf("IP %s on ENI %s is unknown to the pool after restart: leaked", ip, id)
			}
		}
	}
	// A stray ENI tagged for this node but detached (made outside the pool: no intent) is
	// deleted by GC, once a listing ListingGrace after the first still shows it.
	stray, err := p2.cloud.CreateENI(context.Background(), aliyun.CreateENIRequest{
		VSwitchID: "vsw-test-a", SecurityGroups: []string{"sg-test"}, Tags: p2.ownTags(), Token: newToken()})
	if err != nil {
		t.Fatal(err)
	}
	res, err = p2.GC(context.Background(), func() map[string]bool { return live })
	if err != nil {
		t.Fatal(err)
	}
	if len(res.DeletedENIs) != 0 {
		t.Errorf("GC deleted %v on the first sight of the stray; it must wait ListingGrace", res.DeletedENIs)
	}
	time.Sleep(e.grace)
	res, err = p2.GC(context.Background(), func() map[string]bool { return live })
	if err != nil {
		t.Fatal(err)
	}
	// The pool's own periodic listing comparison may have deleted it first (it applies the
	// same grace); either way it is gone, and GC deleted nothing else.
	if len(res.DeletedENIs) > 1 || (len(res.DeletedENIs) == 1 && res.DeletedENIs[0] != stray.ID) {
		t.Errorf("GC deleted %v, want at most the stray ENI %s", res.DeletedENIs, stray.ID)
	}
	if _, ok := e.emu.Snapshot().ENI(stray.ID); ok {
		t.Errorf("stray ENI %s still exists after GC", stray.ID)
	}

	s := p2.Status()
	if s.Idle > cfg.MaxPoolSize {
		t.Errorf("idle %d above max_pool_size %d after GC", s.Idle, cfg.MaxPoolSize)
	}
	assertNoLeak(t, p2, e.emu, st2, bigNode)
}

// waitQuiet waits until the emulator has seen no call for a while, so calls abandoned by the
// crashed pool have landed before the restart looks at the cloud.
func waitQuiet(t *testing.T, emu *ecsemu.Emulator) {
	t.Helper()
	last := totalCalls(emu.Snapshot())
	for stable := 0; stable < 10; {
		time.Sleep(30 * time.Millisecond)
		n := totalCalls(emu.Snapshot())
		if n == last {
			stable++
		} else {
			stable, last = 0, n
		}
	}
}

// fakeClock is a settable clock for idle-age decisions.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func TestWarmUpRefillAndIdleReclaim(t *testing.T) {
	e := newEnv(t)
	doc := fmt.Sprintf(`{"vswitches":{%q:["vsw-test-a"]},"security_group":"sg-test","min_pool_size":2,"max_pool_size":10,"ip_warm_up_size":6,"idle_ip_reclaim_after":"5m"}`, zone)
	cfg, _, err := eniconfig.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	clock := &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	st, err := store.Open(e.dbPath, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	p, err := New(Options{Cloud: e.client(), Store: st, Config: cfg, InstanceID: bigNode, NodeName: nodeName, ClusterID: clusterTag,
		Logger: zaptest.NewLogger(t), BatchWindow: time.Millisecond, MaintainInterval: time.Hour, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer p.Stop()
	if s := p.Status(); s.Idle != 6 {
		t.Fatalf("after first start idle = %d, want ip_warm_up_size 6", s.Idle)
	}

	// Taking addresses below min_pool_size triggers a refill back to it.
	allocateAll(t, p, 0, 5)
	deadline := time.Now().Add(10 * time.Second)
	for p.Status().Idle < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("idle stayed at %d, below min_pool_size 2", p.Status().Idle)
		}
		time.Sleep(5 * time.Millisecond)
	}

	for i := range 5 {
		if err := p.Release(context.Background(), podKey(i)); err != nil {
			t.Fatal(err)
		}
	}
	p.opMu.Lock()
	p.reclaim(context.Background())
	idleBefore := p.Status().Idle
	p.opMu.Unlock()
	if idleBefore <= 2 {
		t.Fatalf("idle %d: the test needs more than min idle before the clock moves", idleBefore)
	}

	// Idle for longer than idle_ip_reclaim_after: released down to min_pool_size.
	clock.Advance(6 * time.Minute)
	p.opMu.Lock()
	p.reclaim(context.Background())
	p.opMu.Unlock()
	if s := p.Status(); s.Idle != 2 {
		t.Fatalf("after idle_ip_reclaim_after idle = %d (was %d), want min_pool_size 2", s.Idle, idleBefore)
	}
	assertNoLeak(t, p, e.emu, st, bigNode)

	// The warm-up is for the first start only: a restart keeps the pool at min.
	p.Stop()
	p2, err := New(Options{Cloud: e.client(), Store: st, Config: cfg, InstanceID: bigNode, NodeName: nodeName, ClusterID: clusterTag,
		Logger: zaptest.NewLogger(t), BatchWindow: time.Millisecond, MaintainInterval: time.Hour, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	if err := p2.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer p2.Stop()
	if s := p2.Status(); s.Idle != 2 {
		t.Fatalf("after restart idle = %d, want 2 (no second warm-up)", s.Idle)
	}
}

func TestHotPlugOffNeverCreatesENIs(t *testing.T) {
	e := newEnv(t)
	doc := fmt.Sprintf(`{"vswitches":{%q:["vsw-test-a"]},"security_group":"sg-test","hot_plug":false}`, zone)
	cfg, _, err := eniconfig.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	p, st := e.startPool(bigNode, cfg)
	defer st.Close()
	defer p.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = p.Allocate(ctx, podKey(0))
	if !errors.Is(err, ErrNodeFull) {
		t.Fatalf("hot_plug=false with no ENI: err = %v, want ErrNodeFull", err)
	}
	if n := e.emu.Snapshot().Calls["CreateNetworkInterface"]; n != 0 {
		t.Fatalf("hot_plug=false made %d CreateNetworkInterface calls", n)
	}
}

// BenchmarkAllocateRelease measures one Allocate+Release on a warm pool (no cloud call on the
// path; dominated by the two fsynced store commits).
func BenchmarkAllocateRelease(b *testing.B) {
	cfg := ecsemu.TestConfig()
	cfg.AddInstance(bigNode, "ecs.g7.4xlarge", "vsw-test-a", "192.168.1.11")
	_, ep := ecsemu.NewTestServer(b, cfg)
	c, err := aliyun.New(aliyun.Options{RegionID: ecsemu.TestRegion, Endpoint: ep, PollInterval: 5 * time.Millisecond,
		Credential: credential.Credential{AccessKeyID: ecsemu.TestAccessKeyID, AccessKeySecret: ecsemu.TestAccessKeySecret}})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	st, err := store.Open(filepath.Join(b.TempDir(), "ipam.db"), time.Second)
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	conf, _, err := eniconfig.Parse([]byte(fmt.Sprintf(`{"vswitches":{%q:["vsw-test-a"]},"security_group":"sg-test","min_pool_size":5,"max_pool_size":10}`, zone)))
	if err != nil {
		b.Fatal(err)
	}
	p, err := New(Options{Cloud: c, Store: st, Config: conf, InstanceID: bigNode, NodeName: nodeName, MaintainInterval: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	if err := p.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	defer p.Stop()
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		k := podKey(i)
		if _, err := p.Allocate(ctx, k); err != nil {
			b.Fatal(err)
		}
		if err := p.Release(ctx, k); err != nil {
			b.Fatal(err)
		}
	}
}

// TestCapacityMatchesPlanningTable fills a node of each instance type of the published ENIIP
// planning table through the pool and the emulator's quotas: pods = (EniQuantity − 1) ×
// EniPrivateIpAddressQuantity, and one more pod is refused with ErrNodeFull.
func TestCapacityMatchesPlanningTable(t *testing.T) {
	for _, tc := range []struct {
		typ       string
		enis, ips int
		pods      int
	}{
		{"ecs.g7.large", 3, 6, 12},
		{"ecs.g7.xlarge", 4, 10, 30},
		{"ecs.g7.2xlarge", 4, 15, 45},
		{"ecs.g7.4xlarge", 8, 20, 140},
	} {
		t.Run(tc.typ, func(t *testing.T) {
			const inst = "i-plan-0001"
			cfg := ecsemu.TestConfig()
			cfg.AddInstance(inst, tc.typ, "vsw-test-a", "192.168.1.12")
			emu, ep := ecsemu.NewTestServer(t, cfg)
			e := &env{t: t, emu: emu, endpoint: ep, dbPath: filepath.Join(t.TempDir(), "ipam.db")}
			p, st := e.startPool(inst, eniConf(t, 0, 0, "vsw-test-a"))
			defer st.Close()
			defer p.Stop()

			c := p.Capacity()
			if c.MaxPods != tc.pods || c.ENIs != tc.enis-1 || c.IPsPerENI != tc.ips {
				t.Fatalf("capacity %+v, want %d ENIs × %d IPs = %d pods", c, tc.enis-1, tc.ips, tc.pods)
			}
			allocs := allocateAll(t, p, 0, tc.pods)
			ips := map[netip.Addr]bool{}
			for _, a := range allocs {
				ips[a.IP] = true
			}
			if len(ips) != tc.pods {
				t.Fatalf("%d distinct addresses for %d pods", len(ips), tc.pods)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := p.Allocate(ctx, podKey(tc.pods))
			cancel()
			if !errors.Is(err, ErrNodeFull) {
				t.Fatalf("allocation %d on %s: err = %v, want ErrNodeFull", tc.pods+1, tc.typ, err)
			}
			cloud := ourENIs(e.emu.Snapshot())
			held := 0
			for _, ce := range cloud {
				held += len(ce.IPs)
			}
			if len(cloud) != tc.enis-1 || held != tc.pods {
				t.Errorf("cloud: %d ENIs with %d addresses, want %d ENIs with %d", len(cloud), held, tc.enis-1, tc.pods)
			}
			if s := p.Status(); s.InUse != tc.pods || s.Idle != 0 {
				t.Errorf("status: %d in use, %d idle; want %d and 0", s.InUse, s.Idle, tc.pods)
			}
			assertNoLeak(t, p, e.emu, st, inst)
		})
	}
}
