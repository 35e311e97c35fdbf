package fixedip_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/credential"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/fixedip"
	"github.com/tern-net/tern/ipam/store"
	"github.com/tern-net/tern/test/ecsemu"
)

// These tests run two nodes' pools through the real SDK against the ECS emulator; the
// FixedIP records are an in-memory store with the apiserver's resourceVersion rule (the lab
// test uses the real apiserver).

const zone = "cn-hangzhou-h"

// memRecords is Records with resourceVersion-conditional writes.
type memRecords struct {
	mu  sync.Mutex
	rv  int
	m   map[string]fixedip.Record
	ops []string // "create|update|delete ns/name node phase"
}

func newMemRecords() *memRecords { return &memRecords{m: map[string]fixedip.Record{}} }

func (r *memRecords) Get(_ context.Context, ns, name string) (*fixedip.Record, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rec, ok := r.m[ns+"/"+name]
	if !ok {
		return nil, nil
	}
	return &rec, nil
}

func (r *memRecords) write(op string, rec fixedip.Record) fixedip.Record {
	r.rv++
	rec.ResourceVersion = strconv.Itoa(r.rv)
	r.m[rec.Namespace+"/"+rec.Name] = rec
	r.ops = append(r.ops, fmt.Sprintf("%s %s/%s %s %s", op, rec.Namespace, rec.Name, rec.Node, rec.Phase))
	return rec
}

func (r *memRecords) Create(_ context.Context, rec fixedip.Record) (fixedip.Record, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.m[rec.Namespace+"/"+rec.Name]; ok {
		return fixedip.Record{}, fixedip.ErrConflict
	}
	return r.write("create", rec), nil
}

func (r *memRecords) Update(_ context.Context, rec fixedip.Record) (fixedip.Record, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	cur, ok := r.m[rec.Namespace+"/"+rec.Name]
	if !ok || cur.ResourceVersion != rec.ResourceVersion {
		return fixedip.Record{}, fixedip.ErrConflict
	}
	return r.write("update", rec), nil
}

func (r *memRecords) Delete(_ context.Context, rec fixedip.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	cur, ok := r.m[rec.Namespace+"/"+rec.Name]
	if !ok {
		return nil
	}
	if cur.ResourceVersion != rec.ResourceVersion {
		return fixedip.ErrConflict
	}
	delete(r.m, rec.Namespace+"/"+rec.Name)
	r.ops = append(r.ops, fmt.Sprintf("delete %s/%s", rec.Namespace, rec.Name))
	return nil
}

// pods serves the pod as the test sets it.
type pods struct {
	mu   sync.Mutex
	pods map[string]fixedip.Pod
	sets map[string]fixedip.SetState
}

func (p *pods) Pod(_ context.Context, ns, name string) (fixedip.Pod, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pod, ok := p.pods[ns+"/"+name]
	return pod, ok
}

func (p *pods) StatefulSet(ns, name string) (fixedip.SetState, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sets[ns+"/"+name], nil
}

func (p *pods) set(pod fixedip.Pod) {
	p.mu.Lock()
	p.pods[pod.Namespace+"/"+pod.Name] = pod
	p.mu.Unlock()
}

type event struct{ ns, name, reason, msg string }

type events struct {
	mu  sync.Mutex
	got []event
}

func (e *events) PodEvent(ns, name string, _ bool, reason, msg string) {
	e.mu.Lock()
	e.got = append(e.got, event{ns, name, reason, msg})
	e.mu.Unlock()
}

func (e *events) reasons() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []string
	for _, ev := range e.got {
		out = append(out, ev.reason)
	}
	return out
}

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

type node struct {
	name, instance string
	pool           *ipam.Pool
	cloud          *aliyun.Client
	m              *fixedip.Manager
}

type world struct {
	t       *testing.T
	emu     *ecsemu.Emulator
	records *memRecords
	pods    *pods
	events  *events
	clock   *clock
	nodes   []*node
}

func newWorld(t *testing.T, lag ecsemu.ListingLag) *world {
	t.Helper()
	cfg := ecsemu.TestConfig()
	cfg.AddInstance("i-test-0002", "ecs.g7.large", "vsw-test-a", "192.168.1.12")
	cfg.AddInstance("i-test-0003", "ecs.g7.large", "vsw-test-a", "192.168.1.13")
	cfg.ListingLag = lag
	emu, ep := ecsemu.NewTestServer(t, cfg)
	w := &world{t: t, emu: emu, records: newMemRecords(), events: &events{}, clock: &clock{now: time.Now()},
		pods: &pods{pods: map[string]fixedip.Pod{}, sets: map[string]fixedip.SetState{"db/web": {Exists: true, Replicas: 3}}}}
	doc := fmt.Sprintf(`{"vswitches":{%q:["vsw-test-a"]},"security_group":"sg-test","min_pool_size":2,"max_pool_size":5}`, zone)
	eni, _, err := eniconfig.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	for i, inst := range []string{"i-test-0001", "i-test-0002", "i-test-0003"} {
		cloud, err := aliyun.New(aliyun.Options{
			RegionID:   ecsemu.TestRegion,
			Credential: credential.Credential{AccessKeyID: ecsemu.TestAccessKeyID, AccessKeySecret: ecsemu.TestAccessKeySecret},
			Endpoint:   ep, PollInterval: 5 * time.Millisecond, WaitTimeout: 10 * time.Second,
			Backoff: aliyun.Backoff{Initial: 5 * time.Millisecond, Max: 50 * time.Millisecond, Multiplier: 2, Jitter: 0.5, MaxAttempts: 6},
			Logger:  zaptest.NewLogger(t).Named("cloud"),
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(cloud.Close)
		st, err := store.Open(filepath.Join(t.TempDir(), "ipam.db"), time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = st.Close() })
		name := fmt.Sprintf("node-%d", i+1)
		pool, err := ipam.New(ipam.Options{Cloud: cloud, Store: st, Config: eni, InstanceID: inst, NodeName: name,
			ClusterID: "c", Logger: zaptest.NewLogger(t).Named(name), MaintainInterval: time.Hour, AllocateWait: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err = pool.Start(ctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pool.Stop)
		m, err := fixedip.New(fixedip.Options{Pool: pool, Cloud: cloud, Records: w.records, Pods: w.pods, Events: w.events,
			Node: name, HoldTime: time.Minute, AssignWait: 3 * time.Second, Now: w.clock.Now, Logger: zaptest.NewLogger(t).Named(name)})
		if err != nil {
			t.Fatal(err)
		}
		w.nodes = append(w.nodes, &node{name: name, instance: inst, pool: pool, cloud: cloud, m: m})
	}
	return w
}

// holders lists the ENIs of the cloud that have ip, and fails on more than one.
func (w *world) holders(ip netip.Addr) []string {
	w.t.Helper()
	var out []string
	for _, e := range w.emu.Snapshot().ENIs {
		if slices.Contains(e.IPs, ip.String()) {
			out = append(out, e.ID)
		}
	}
	if len(out) > 1 {
		w.t.Fatalf("address %s is on %d ENIs at once: %v", ip, len(out), out)
	}
	return out
}

// eniOf is the instance an ENI is attached to.
func (w *world) instanceOf(eni string) string {
	e, _ := w.emu.Snapshot().ENI(eni)
	return e.InstanceID
}

func key(name, cid string) ipam.PodKey {
	return ipam.PodKey{Namespace: "db", Name: name, ContainerID: cid}
}

func statefulPod(name, uid string) fixedip.Pod {
	return fixedip.Pod{Namespace: "db", Name: name, UID: uid, Fixed: true, StatefulSet: "web", Ordinal: fixedip.Ordinal(name, "web")}
}

// TestFixedAddressFollowsItsPodAcrossNodes: a StatefulSet pod keeps its address when it is
// recreated on another node of its zone: the address leaves the first node's ENI and comes to
// the second's (the assign retried while the emulator still reports the unassign settling),
// the first node forgets its hold, the record says where it is; after the hold time past a
// final delete, the address goes back to the pool and the record goes. Never two ENIs with it.
func TestFixedAddressFollowsItsPodAcrossNodes(t *testing.T) {
	w := newWorld(t, ecsemu.ListingLag{Unassigned: ecsemu.Duration(300 * time.Millisecond), Reassign: ecsemu.Duration(400 * time.Millisecond)})
	ctx := context.Background()
	n1, n2 := w.nodes[0], w.nodes[1]

	w.pods.set(statefulPod("web-0", "uid-1"))
	a1, err := n1.m.Allocate(ctx, key("web-0", "c1"))
	if err != nil {
		t.Fatal(err)
	}
	ip := a1.IP
	if h := w.holders(ip); len(h) != 1 || w.instanceOf(h[0]) != n1.instance {
		t.Fatalf("%s is on %v, want one ENI of %s", ip, h, n1.instance)
	}
	// A restart in place keeps it.
	if err := n1.m.Release(ctx, key("web-0", "c1")); err != nil {
		t.Fatal(err)
	}
	rec, _ := w.records.Get(ctx, "db", "web-0")
	if rec.Phase != fixedip.PhaseHeld || rec.Node != "node-1" || !rec.ReleaseAfter.Equal(w.clock.Now().Add(time.Minute)) {
		t.Fatalf("after DEL the record is %+v; want Held on node-1 for the hold time", rec)
	}
	if again, err := n1.m.Allocate(ctx, key("web-0", "c2")); err != nil || again.IP != ip {
		t.Fatalf("restart on node-1 got %v, %v; want %s", again.IP, err, ip)
	}
	if err := n1.m.Release(ctx, key("web-0", "c2")); err != nil {
		t.Fatal(err)
	}

	// Recreated on node-2 (a new pod object: a new UID).
	w.pods.set(statefulPod("web-0", "uid-2"))
	start := time.Now()
	a2, err := n2.m.Allocate(ctx, key("web-0", "c3"))
	if err != nil {
		t.Fatalf("%v; errors %v; holders %v; records %v", err, w.emu.Snapshot().Errors, w.holders(ip), w.records.ops)
	}
	took := time.Since(start)
	if a2.IP != ip {
		t.Fatalf("on node-2 the pod got %s; want its fixed %s", a2.IP, ip)
	}
	if h := w.holders(ip); len(h) != 1 || h[0] != a2.ENI.ID || w.instanceOf(h[0]) != n2.instance {
		t.Fatalf("%s is on %v after the move; want only %s of %s", ip, h, a2.ENI.ID, n2.instance)
	}
	if took < 300*time.Millisecond {
		t.Fatalf("the move took %s: the emulator keeps an unassigned address busy for 400ms, so the assign must have been retried", took)
	}
	if n := w.emu.Snapshot().Errors[ecsemu.CodeIPAddressAlreadyUsed]; n == 0 {
		t.Fatal("the emulator never answered InvalidPrivateIpAddress.Duplicated: the retry path was not exercised")
	}
	rec, _ = w.records.Get(ctx, "db", "web-0")
	if rec.Node != "node-2" || rec.Phase != fixedip.PhaseInUse || rec.ENIID != a2.ENI.ID || rec.PodUID != "uid-2" {
		t.Fatalf("record after the move: %+v", rec)
	}
	// node-1 still has its hold until its pass sees the record.
	n1.m.Sweep(ctx)
	for k := range n1.pool.Allocations() {
		if k.Name == "web-0" {
			t.Fatalf("node-1 still holds %s for web-0 after the move", k)
		}
	}
	for _, e := range n1.pool.Status().ENIs {
		if slices.Contains(e.IPs, ip) {
			t.Fatalf("node-1's pool still lists %s on %s", ip, e.ID)
		}
	}

	// Final delete: held on node-2, kept within the hold time, released after it.
	if err := n2.m.Release(ctx, key("web-0", "c3")); err != nil {
		t.Fatal(err)
	}
	w.clock.Advance(59 * time.Second)
	n2.m.Sweep(ctx)
	if rec, _ := w.records.Get(ctx, "db", "web-0"); rec == nil || rec.Phase != fixedip.PhaseHeld {
		t.Fatalf("within the hold time the record is %+v; want Held", rec)
	}
	w.clock.Advance(2 * time.Second)
	n2.m.Sweep(ctx)
	if rec, _ := w.records.Get(ctx, "db", "web-0"); rec != nil {
		t.Fatalf("past the hold time the record is still %+v", rec)
	}
	for k := range n2.pool.Allocations() {
		if k.Name == "web-0" {
			t.Fatalf("node-2 still holds %s past the hold time", k)
		}
	}
	// Back in the pool: an ordinary pod may get it now.
	if st := n2.pool.Status(); st.InUse != 0 {
		t.Fatalf("node-2 has %d addresses in use after the release, want 0", st.InUse)
	}
	t.Logf("move took %s; records: %v", took, w.records.ops)
}

// TestFixedAddressConflictsGiveEventsNeverTwoPods: the conflicts a fixed address can meet
// each give the pod a Warning Event and "try again" (or a refusal), and never put one address
// on two pods or two ENIs: another pod of the node holds it; an ENI outside tern's pools holds
// it (the cloud keeps answering Duplicated); the record is of another zone. Two nodes
// claiming one held address at once: exactly one wins.
func TestFixedAddressConflictsGiveEventsNeverTwoPods(t *testing.T) {
	w := newWorld(t, ecsemu.ListingLag{})
	ctx := context.Background()
	n1, n2, n3 := w.nodes[0], w.nodes[1], w.nodes[2]

	// 1. Another pod of node-2 has the address the record names on node-2.
	other, err := n2.pool.Allocate(ctx, key("other", "o1"))
	if err != nil {
		t.Fatal(err)
	}
	w.records.mu.Lock()
	w.records.write("create", fixedip.Record{Namespace: "db", Name: "web-1", IP: other.IP, VSwitchID: "vsw-test-a", ZoneID: zone,
		Node: "node-2", ENIID: other.ENI.ID, Phase: fixedip.PhaseHeld, StatefulSet: "web"})
	w.records.mu.Unlock()
	w.pods.set(statefulPod("web-1", "uid-w1"))
	_, err = n2.m.Allocate(ctx, key("web-1", "c1"))
	if !errors.Is(err, ipam.ErrTryAgain) {
		t.Fatalf("ADD of web-1 whose address another pod holds: %v; want try again", err)
	}
	if owner := n2.pool.Allocations()[key("other", "o1")]; owner.IP != other.IP {
		t.Fatalf("the other pod lost its address: %+v", owner)
	}
	if _, ok := n2.pool.Allocations()[key("web-1", "c1")]; ok {
		t.Fatal("web-1 got an allocation while another pod holds its address")
	}
	if !slices.Contains(w.events.reasons(), "TernFixedIPConflict") {
		t.Fatalf("events %v; want TernFixedIPConflict", w.events.reasons())
	}

	// 2. An ENI outside tern's pools has the address: the claim's unassign of the recorded
	// ENI finds nothing, the assign is refused "in use" until AssignWait, then try again.
	foreign, err := n1.cloud.CreateENI(ctx, aliyun.CreateENIRequest{VSwitchID: "vsw-test-a", SecurityGroups: []string{"sg-test"}, Token: "foreign"})
	if err != nil {
		t.Fatal(err)
	}
	stolen := netip.MustParseAddr("192.168.1.200")
	if _, err := n1.cloud.AssignSpecificIPs(ctx, foreign.ID, []netip.Addr{stolen}, "foreign-ip"); err != nil {
		t.Fatal(err)
	}
	w.records.mu.Lock()
	w.records.write("create", fixedip.Record{Namespace: "db", Name: "web-2", IP: stolen, VSwitchID: "vsw-test-a", ZoneID: zone,
		Node: "node-1", ENIID: "eni-gone", Phase: fixedip.PhaseHeld, StatefulSet: "web"})
	w.records.mu.Unlock()
	w.pods.set(statefulPod("web-2", "uid-w2"))
	before := len(w.events.reasons())
	_, err = n3.m.Allocate(ctx, key("web-2", "c1"))
	if !errors.Is(err, ipam.ErrTryAgain) {
		t.Fatalf("ADD of web-2 whose address a foreign ENI holds: %v; want try again", err)
	}
	if h := w.holders(stolen); len(h) != 1 || h[0] != foreign.ID {
		t.Fatalf("%s is on %v; want only the foreign ENI %s", stolen, h, foreign.ID)
	}
	if got := w.events.reasons()[before:]; !slices.Contains(got, "TernFixedIPConflict") {
		t.Fatalf("events %v; want TernFixedIPConflict", got)
	}

	// 3. A record of another zone: refused with an Event naming the zone.
	w.records.mu.Lock()
	w.records.write("create", fixedip.Record{Namespace: "db", Name: "web-3", IP: netip.MustParseAddr("192.168.2.50"), VSwitchID: "vsw-test-b",
		ZoneID: "cn-hangzhou-k", Node: "node-9", Phase: fixedip.PhaseHeld, StatefulSet: "web"})
	w.records.mu.Unlock()
	w.pods.set(statefulPod("web-3", "uid-w3"))
	if _, err := n1.m.Allocate(ctx, key("web-3", "c1")); !errors.Is(err, ipam.ErrWrongZone) {
		t.Fatalf("ADD of web-3 of another zone: %v; want ErrWrongZone", err)
	}
	if !slices.Contains(w.events.reasons(), "TernFixedIPWrongZone") {
		t.Fatalf("events %v; want TernFixedIPWrongZone", w.events.reasons())
	}

	// 4. Two nodes claim one held address at once: one gets it, the other waits.
	w.pods.set(statefulPod("web-0", "uid-a"))
	a, err := n1.m.Allocate(ctx, key("web-0", "c1"))
	if err != nil {
		t.Fatal(err)
	}
	if err := n1.m.Release(ctx, key("web-0", "c1")); err != nil {
		t.Fatal(err)
	}
	w.pods.set(statefulPod("web-0", "uid-b"))
	var wg sync.WaitGroup
	results := make([]error, 2)
	ips := make([]netip.Addr, 2)
	for i, n := range []*node{n2, n3} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			al, err := n.m.Allocate(ctx, key("web-0", "race"+strconv.Itoa(i)))
			results[i], ips[i] = err, al.IP
		}()
	}
	wg.Wait()
	won := 0
	for i, err := range results {
		if err == nil {
			won++
			if ips[i] != a.IP {
				t.Fatalf("the winner got %s; want %s", ips[i], a.IP)
			}
		} else if !errors.Is(err, ipam.ErrTryAgain) {
			t.Fatalf("the loser failed with %v; want try again", err)
		}
	}
	if won != 1 {
		t.Fatalf("%d nodes won the claim (%v); want exactly 1", won, results)
	}
	if h := w.holders(a.IP); len(h) != 1 {
		t.Fatalf("%s on %v", a.IP, h)
	}
	t.Logf("events: %v", w.events.reasons())
}
