//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/lab"
)

// settled waits until the cloud and the agents agree (background refill and reclaim may still
// be running right after the last CNI call) and fails with the last difference otherwise.
func settled(t *testing.T, l *lab.Lab, ctx context.Context) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := l.CheckCloudMatchesAgents(ctx)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("cloud and agents still disagree after 30s: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// agentAllocations returns every agent's allocations as container ID → IP.
func agentAllocations(t *testing.T, l *lab.Lab, ctx context.Context) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, n := range l.Nodes() {
		st, err := n.Client().State(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for k, a := range st.Allocations {
			out[k[strings.LastIndex(k, "/")+1:]] = a.IP
		}
	}
	return out
}

func TestFaultsAndLatencyEveryPodGetsAnAddressNoLeak(t *testing.T) {
	// 30 % of calls fail, every call takes 50 ms more, and an ADD waits at most 200 ms for the
	// pool before answering "try again later", so the kubelet-style retry is exercised.
	l := up(t, lab.Options{Nodes: 2, Seed: 7, Latency: 50 * time.Millisecond, AllocateWait: 200 * time.Millisecond,
		Faults:     []ecsemu.Fault{{Code: ecsemu.CodeThrottling, Rate: 0.15}, {Code: ecsemu.CodeInternalError, Rate: 0.15}},
		ListingLag: lab.LaggingListing,
		ENIConf:    lab.ENIConf{MinPoolSize: 0, MaxPoolSize: 4}})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	emu := l.Emulator()

	pods := addPods(t, l, ctx, 0, 30)
	requireDistinctAddresses(t, pods)
	retried := 0
	for _, p := range pods {
		if p.Attempts > 1 {
			retried++
		}
	}
	s := emu.Snapshot()
	t.Logf("30 pods up; %d needed more than one ADD; injected errors: %v", retried, s.Errors)
	if s.Errors[ecsemu.CodeThrottling]+s.Errors[ecsemu.CodeInternalError] == 0 || retried == 0 {
		t.Fatalf("%d faults injected, %d pods retried: the test exercised neither path", s.Errors[ecsemu.CodeThrottling]+s.Errors[ecsemu.CodeInternalError], retried)
	}
	// Delete half under faults too.
	for i, p := range pods {
		if i%2 == 0 {
			if err := l.DeletePod(ctx, p); err != nil {
				t.Fatal(err)
			}
		}
	}
	emu.ClearFaults()
	emu.SetLatency(0)
	settled(t, l, ctx)
	allocs := agentAllocations(t, l, ctx)
	if len(allocs) != 15 {
		t.Errorf("agents hold %d allocations, want the 15 live pods: %v", len(allocs), allocs)
	}
	for _, p := range l.Pods() {
		if allocs[p.ContainerID] != p.IP.String() {
			t.Errorf("%s has %s, the agent says %q", p.Key(), p.IP, allocs[p.ContainerID])
		}
	}
}

// Crash points of the kill -9 test.
const (
	pointRandom   = "random moment"
	pointAssign   = "AssignPrivateIpAddresses reply lost"
	pointCreate   = "CreateNetworkInterface reply lost"
	pointAttach   = "new ENI still Attaching"
	pointUnassign = "UnassignPrivateIpAddresses in progress"
)

// heldAction is the call whose reply the emulator holds back until the agent is killed.
var heldAction = map[string]string{
	pointAssign:   "AssignPrivateIpAddresses",
	pointCreate:   "CreateNetworkInterface",
	pointAttach:   "AttachNetworkInterface",
	pointUnassign: "UnassignPrivateIpAddresses",
}

// TestAgentKilledDuringBurstNeverGivesAnAddressTwice kills agents with SIGKILL and restarts
// them at once while pods come and go, against a cloud whose listing lags (lab.LaggingListing). Besides
// random moments it kills an agent exactly when a reply is lost: the emulator applies the call,
// holds the reply, and the agent dies waiting for it. Each crash point is hit minHits times.
func TestAgentKilledDuringBurstNeverGivesAnAddressTwice(t *testing.T) {
	const minHits = 5
	points := []string{pointRandom, pointAssign, pointCreate, pointAttach, pointUnassign}
	// ecs.g7.large: two pod ENIs of 6 addresses (the primary included). Pods churn between 1
	// and 8 per node, across the first ENI's 6, so ENIs are created, attached, filled, trimmed
	// by unassigns and deleted all along.
	l := up(t, lab.Options{Nodes: 2, InstanceType: "ecs.g7.large", ENIConf: lab.ENIConf{MinPoolSize: 0, MaxPoolSize: 2},
		ListingLag: lab.LaggingListing,
		Delays:     ecsemu.TransitionDelays{Attach: ecsemu.Duration(500 * time.Millisecond)}})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	emu := l.Emulator()

	churners := startBurst(ctx, l, 1, 8)

	hits, misses := map[string]int{}, map[string]int{}
	kills := 0
	restart := func(n *lab.Node, release func()) {
		if err := n.KillAgent(); err != nil {
			t.Error(err)
		}
		if release != nil {
			release() // the client is gone: nobody reads the reply
		}
		kills++
		if err := n.StartAgent(ctx); err != nil { // at once: the listing still lags
			t.Error(err)
		}
	}
	deadline := time.Now().Add(150 * time.Second)
	for !t.Failed() && time.Now().Before(deadline) {
		point := ""
		for _, p := range points {
			if hits[p] < minHits && (point == "" || hits[p] < hits[point]) {
				point = p
			}
		}
		if point == "" {
			break
		}
		n := l.Node(rand.IntN(2))
		if point == pointRandom {
			time.Sleep(time.Duration(50+rand.IntN(400)) * time.Millisecond)
			restart(n, nil)
			hits[point]++
			continue
		}
		held, release := emu.HoldReply(heldAction[point], func(h ecsemu.HeldCall) bool { return h.Tags[ipam.TagNode] == n.Name })
		select {
		case h := <-held:
			counted := true
			if point == pointAttach {
				s, _ := emu.Snapshot().ENI(h.ENIID)
				counted = s.Status == ecsemu.StatusAttaching
			}
			restart(n, release)
			if counted {
				hits[point]++
			}
		case <-time.After(10 * time.Second):
			release()
			misses[point]++
		}
	}
	ops := churners.end(t)
	t.Logf("%d kills; crash points hit %v (waits that saw no such call: %v); %d ADD/DEL operations", kills, hits, misses, ops)
	for _, p := range points {
		if hits[p] < minHits {
			t.Errorf("crash point %q hit %d times, want at least %d", p, hits[p], minHits)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	live := addressesAfterBurst(t, ctx, l)

	// The survivors still talk, across nodes too.
	for _, p := range live {
		if err := l.Check(ctx, p); err != nil {
			t.Errorf("CNI CHECK of %s after the burst: %v", p.Key(), err)
		}
	}
	if len(live) < 2 {
		return
	}
	srv, err := live[0].Serve(9000)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	for _, p := range live[1:] {
		if got, err := p.Ask(ctx, netip.AddrPortFrom(live[0].IP, 9000).String(), "ping"); err != nil || got != live[0].Key() {
			t.Errorf("%s → %s after the burst: %q, %v", p.Key(), live[0].Key(), got, err)
		}
	}
}

// addressesAfterBurst checks the lab's pods once a burst ended: no address is given to two
// live pods and no live pod lost its address; then GC through libcni releases what
// interrupted ADDs left behind, and the cloud and the agents agree exactly (nothing leaked
// in the emulator, nothing missing in the agents). It returns the live pods.
func addressesAfterBurst(t *testing.T, ctx context.Context, l *lab.Lab) []*lab.Pod {
	t.Helper()
	before := agentAllocations(t, l, ctx)
	live := l.Pods()
	t.Logf("%d live pods; agents hold %d allocations before GC", len(live), len(before))
	seen := map[netip.Addr]string{}
	for _, p := range live {
		if prev, dup := seen[p.IP]; dup {
			t.Errorf("%s and %s both hold %s", prev, p.Key(), p.IP)
		}
		seen[p.IP] = p.Key()
		if before[p.ContainerID] != p.IP.String() {
			t.Errorf("%s has %s but its agent records %q", p.Key(), p.IP, before[p.ContainerID])
		}
	}
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	settled(t, l, ctx)
	after := agentAllocations(t, l, ctx)
	if len(after) != len(live) {
		t.Errorf("after GC the agents hold %d allocations for %d live pods: %v", len(after), len(live), after)
	}
	for _, p := range live {
		if after[p.ContainerID] != p.IP.String() {
			t.Errorf("after GC %s has %s but its agent records %q", p.Key(), p.IP, after[p.ContainerID])
		}
	}
	return live
}

// requireDistinctAddresses fails the test when two of pods hold one address.
func requireDistinctAddresses(t *testing.T, pods []*lab.Pod) {
	t.Helper()
	seen := map[netip.Addr]string{}
	for _, p := range pods {
		if prev, dup := seen[p.IP]; dup {
			t.Fatalf("%s and %s both hold %s", prev, p.Key(), p.IP)
		}
		seen[p.IP] = p.Key()
	}
}

// startPodsUntilUp starts adding the pods named on node at once, each retrying its ADD
// until it succeeds or ctx ends, as a kubelet does while faults fail ADDs or an agent is
// killed and restarted under them. The returned wait, called from the test's goroutine,
// waits for them and fails the test unless every pod runs.
func startPodsUntilUp(t *testing.T, ctx context.Context, l *lab.Lab, node int, ns string, names []string, annotations map[string]string) (wait func() []*lab.Pod) {
	t.Helper()
	pods := make([]*lab.Pod, len(names))
	var wg sync.WaitGroup
	for i, name := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for attempt := 0; ctx.Err() == nil; attempt++ {
				p, err := l.AddPodAnnotated(ctx, node, ns, name, annotations)
				if err == nil {
					pods[i] = p
					return
				}
				t.Logf("%s attempt %d: %v", name, attempt, err)
				select {
				case <-ctx.Done():
				case <-time.After(200 * time.Millisecond):
				}
			}
		}()
	}
	return func() []*lab.Pod {
		t.Helper()
		wg.Wait()
		for i, p := range pods {
			if p == nil {
				t.Fatalf("pod %s never came up: %v", names[i], ctx.Err())
			}
		}
		return pods
	}
}

// burst is pods coming and going on every node of a lab: three churners a node, each adding
// and deleting pods so that the node holds between low and high of them, until end.
type burst struct {
	stop chan struct{}
	wg   sync.WaitGroup
	errs chan error
	ops  atomic.Int64
}

func startBurst(ctx context.Context, l *lab.Lab, low, high int) *burst {
	b := &burst{stop: make(chan struct{}), errs: make(chan error, 3*len(l.Nodes()))}
	for node := range l.Nodes() {
		c := &churn{l: l, node: node, low: low, high: high, grow: true}
		for range 3 {
			b.wg.Add(1)
			go func() {
				defer b.wg.Done()
				if err := c.run(ctx, b.stop, &b.ops); err != nil {
					b.errs <- err
				}
			}()
		}
	}
	return b
}

// end stops the churners, waits for them, reports each one's error on t and returns the
// number of ADD/DEL operations they made.
func (b *burst) end(t *testing.T) int64 {
	t.Helper()
	close(b.stop)
	b.wg.Wait()
	close(b.errs)
	for err := range b.errs {
		t.Error(err)
	}
	return b.ops.Load()
}

// churn keeps one node's pod count swinging between low and high: ADDs until high, then DELs
// until low, from several workers at once.
type churn struct {
	l         *lab.Lab
	node      int
	low, high int

	mu     sync.Mutex
	pods   []*lab.Pod
	adding int
	grow   bool
	seq    int
}

func (c *churn) run(ctx context.Context, stop chan struct{}, ops *atomic.Int64) error {
	for {
		select {
		case <-stop:
			return nil
		default:
		}
		c.mu.Lock()
		if c.grow && len(c.pods)+c.adding >= c.high {
			c.grow = false
		} else if !c.grow && len(c.pods) <= c.low {
			c.grow = true
		}
		if c.grow {
			c.adding++
			c.seq++
			name := fmt.Sprintf("n%d-pod-%d", c.node, c.seq)
			c.mu.Unlock()
			p, err := c.l.AddPod(ctx, c.node, "burst", name)
			c.mu.Lock()
			c.adding--
			if err == nil {
				c.pods = append(c.pods, p)
			}
			c.mu.Unlock()
			if err != nil {
				return fmt.Errorf("ADD of %s: %w", name, err)
			}
		} else {
			j := rand.IntN(len(c.pods))
			p := c.pods[j]
			c.pods = append(c.pods[:j], c.pods[j+1:]...)
			c.mu.Unlock()
			if err := c.l.DeletePod(ctx, p); err != nil {
				return err
			}
		}
		ops.Add(1)
	}
}

func TestVSwitchExhaustionThenHotReloadedVSwitch(t *testing.T) {
	const tiny, spare = "vsw-lab-tiny", "vsw-lab-spare"
	l := up(t, lab.Options{Nodes: 1,
		ExtraVSwitches: []ecsemu.VSwitchConfig{
			{ID: tiny, Zone: lab.Zone, CIDR: "192.168.32.0/29"}, // 4 usable: 4 pods (the ENI's primary serves one)
			{ID: spare, Zone: lab.Zone, CIDR: "192.168.33.0/24"},
		},
		ENIConf: lab.ENIConf{VSwitches: []string{tiny}, MaxPoolSize: 3}})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	for i := range 4 {
		if _, err := l.AddPod(ctx, 0, "default", fmt.Sprintf("fits-%d", i)); err != nil {
			t.Fatalf("pod %d of 4 on the /29: %v", i, err)
		}
	}
	_, err := l.AddPod(ctx, 0, "default", "too-many")
	te, ok := lab.CNIError(err)
	if !ok || te.Code != 100 || !strings.Contains(te.Error(), tiny) {
		t.Fatalf("5th pod on an exhausted vSwitch: %v; want CNI error 100 naming %s", err, tiny)
	}
	t.Logf("exhausted: %v", te)

	n := l.Node(0)
	c := n.ENIConf()
	c.VSwitches = []string{tiny, spare}
	if err := n.UpdateENIConf(c); err != nil {
		t.Fatal(err)
	}
	// The agent polls eni_conf every 100 ms; until then the error may persist.
	deadline := time.Now().Add(20 * time.Second)
	for {
		p, err := l.AddPod(ctx, 0, "default", "too-many")
		if err == nil {
			if !netip.MustParsePrefix("192.168.33.0/24").Contains(p.IP) {
				t.Fatalf("pod after the reload got %s, want an address of %s", p.IP, spare)
			}
			break
		}
		if te, ok := lab.CNIError(err); !ok || te.Code != 100 || time.Now().After(deadline) {
			t.Fatalf("after adding %s to eni_conf: %v", spare, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := n.Status(ctx); err != nil {
		t.Errorf("CNI STATUS: %v", err)
	}
	settled(t, l, ctx)
}
