//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

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
		Faults:  []ecsemu.Fault{{Code: ecsemu.CodeThrottling, Rate: 0.15}, {Code: ecsemu.CodeInternalError, Rate: 0.15}},
		ENIConf: lab.ENIConf{MinPoolSize: 0, MaxPoolSize: 4}})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	emu := l.Emulator()

	pods := addPods(t, l, ctx, 0, 30)
	retried := 0
	seen := map[netip.Addr]string{}
	for _, p := range pods {
		if prev, dup := seen[p.IP]; dup {
			t.Fatalf("%s and %s both got %s", prev, p.Key(), p.IP)
		}
		seen[p.IP] = p.Key()
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

func TestAgentKilledDuringBurstNeverGivesAnAddressTwice(t *testing.T) {
	l := up(t, lab.Options{Nodes: 2, ENIConf: lab.ENIConf{MinPoolSize: 1, MaxPoolSize: 4}})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))

	// The killer: kill -9 a random agent at random moments, restart it shortly after.
	stop := make(chan struct{})
	var kills int
	var killerErr error
	var kwg sync.WaitGroup
	kwg.Add(1)
	go func() {
		defer kwg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(100+rng.IntN(300)) * time.Millisecond):
			}
			n := l.Node(rng.IntN(2))
			if err := n.KillAgent(); err != nil {
				killerErr = err
				return
			}
			kills++
			time.Sleep(time.Duration(rng.IntN(150)) * time.Millisecond)
			if err := n.StartAgent(ctx); err != nil {
				killerErr = err
				return
			}
		}
	}()

	// The burst: 50 operations, 35 ADDs and 15 DELs of pods added earlier in the burst.
	var wg sync.WaitGroup
	var mu sync.Mutex
	var added []*lab.Pod
	errs := make(chan error, 50)
	for i := range 35 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, err := l.AddPod(ctx, i%2, "burst", fmt.Sprintf("pod-%d", i))
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			added = append(added, p)
			mu.Unlock()
		}()
	}
	for range 15 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				mu.Lock()
				var p *lab.Pod
				if len(added) > 0 {
					j := rng.IntN(len(added))
					p = added[j]
					added = append(added[:j], added[j+1:]...)
				}
				mu.Unlock()
				if p == nil {
					time.Sleep(50 * time.Millisecond)
					continue
				}
				if err := l.DeletePod(ctx, p); err != nil {
					errs <- err
				}
				return
			}
		}()
	}
	wg.Wait()
	close(stop)
	kwg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if killerErr != nil {
		t.Fatalf("killer: %v", killerErr)
	}
	if t.Failed() {
		t.FailNow()
	}
	if kills == 0 {
		t.Fatal("no agent was killed: the test proved nothing")
	}
	for _, n := range l.Nodes() {
		if n.AgentPID() == 0 {
			if err := n.StartAgent(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	before := agentAllocations(t, l, ctx)
	live := l.Pods()
	t.Logf("%d kills; %d live pods; agents hold %d allocations before GC", kills, len(live), len(before))
	if len(live) != 20 {
		t.Fatalf("%d live pods, want 35-15=20", len(live))
	}

	// Every live pod's address is its own, by the agents' records and by the pods' interfaces.
	seen := map[netip.Addr]string{}
	for _, p := range live {
		if prev, dup := seen[p.IP]; dup {
			t.Fatalf("%s and %s both hold %s", prev, p.Key(), p.IP)
		}
		seen[p.IP] = p.Key()
		if before[p.ContainerID] != p.IP.String() {
			t.Errorf("%s has %s but its agent records %q", p.Key(), p.IP, before[p.ContainerID])
		}
	}
	// GC through libcni releases what interrupted ADDs left behind.
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	after := agentAllocations(t, l, ctx)
	if len(after) != len(live) {
		t.Errorf("after GC the agents hold %d allocations for %d live pods: %v", len(after), len(live), after)
	}
	settled(t, l, ctx)

	// The survivors still talk, across nodes too.
	for _, p := range live {
		if err := l.Check(ctx, p); err != nil {
			t.Errorf("CNI CHECK of %s after the burst: %v", p.Key(), err)
		}
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

func TestVSwitchExhaustionThenHotReloadedVSwitch(t *testing.T) {
	const tiny, spare = "vsw-lab-tiny", "vsw-lab-spare"
	l := up(t, lab.Options{Nodes: 1,
		ExtraVSwitches: []ecsemu.VSwitchConfig{
			{ID: tiny, Zone: lab.Zone, CIDR: "192.168.32.0/29"}, // 4 usable: the ENI's primary and 3 pods
			{ID: spare, Zone: lab.Zone, CIDR: "192.168.33.0/24"},
		},
		ENIConf: lab.ENIConf{VSwitches: []string{tiny}, MaxPoolSize: 3}})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	for i := range 3 {
		if _, err := l.AddPod(ctx, 0, "default", fmt.Sprintf("fits-%d", i)); err != nil {
			t.Fatalf("pod %d of 3 on the /29: %v", i, err)
		}
	}
	_, err := l.AddPod(ctx, 0, "default", "too-many")
	te, ok := lab.CNIError(err)
	if !ok || te.Code != 100 || !strings.Contains(te.Error(), tiny) {
		t.Fatalf("4th pod on an exhausted vSwitch: %v; want CNI error 100 naming %s", err, tiny)
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
