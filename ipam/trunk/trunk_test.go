package trunk_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/credential"
	"github.com/tern-net/tern/ipam/trunk"
	"github.com/tern-net/tern/test/ecsemu"
)

func setup(t *testing.T) (*ecsemu.Emulator, *aliyun.Client) {
	t.Helper()
	emu, c, _ := setupEndpoint(t)
	return emu, c
}

// setupEndpoint is setup that also returns the emulator's host:port.
func setupEndpoint(t *testing.T) (*ecsemu.Emulator, *aliyun.Client, string) {
	t.Helper()
	cfg := ecsemu.TestConfig()
	cfg.SetTrunking("ecs.g7.large", 6) // 3 member ENIs
	emu, ep := ecsemu.NewTestServer(t, cfg)
	emu.SetDelays(ecsemu.TransitionDelays{Attach: ecsemu.Duration(20 * time.Millisecond), Detach: ecsemu.Duration(20 * time.Millisecond),
		Delete: ecsemu.Duration(5 * time.Millisecond), MemberAttach: ecsemu.Duration(10 * time.Millisecond)})
	c, err := aliyun.New(aliyun.Options{
		RegionID:     ecsemu.TestRegion,
		Credential:   credential.Credential{AccessKeyID: ecsemu.TestAccessKeyID, AccessKeySecret: ecsemu.TestAccessKeySecret},
		Endpoint:     ep,
		PollInterval: 5 * time.Millisecond,
		WaitTimeout:  10 * time.Second,
		// TestBurstUnderFaults fails 30 % of calls at random, and a call that fails every
		// attempt fails its pod's Allocate: with 8 attempts that is 0.3^8 = 6.6e-5 a call,
		// about 0.2 % of runs at its ~35 create/attach/detach/delete calls (the waits poll
		// through failures). 16 attempts make it 0.3^16 = 4.3e-9 a call.
		Backoff: aliyun.Backoff{Initial: time.Millisecond, Max: 5 * time.Millisecond, Multiplier: 2, Jitter: 0.5, MaxAttempts: 16},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return emu, c, ep
}

func opts() trunk.Options {
	return trunk.Options{InstanceID: "i-test-0001", NodeName: "node1", ClusterID: "c1", VSwitchID: "vsw-test-a", SecurityGroups: []string{"sg-test"}}
}

func started(t *testing.T, c aliyun.TrunkCloud) *trunk.Manager {
	t.Helper()
	m := trunk.New(c, opts(), zaptest.NewLogger(t))
	if err := m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	return m
}

// cleanCloud asserts the emulator holds exactly what it held at the start: the ENIs and every
// vSwitch's free address count.
func cleanCloud(t *testing.T, emu *ecsemu.Emulator, before ecsemu.State) {
	t.Helper()
	after := emu.Snapshot()
	if len(after.ENIs) != len(before.ENIs) {
		t.Fatalf("%d ENIs in the cloud, want %d: %+v", len(after.ENIs), len(before.ENIs), after.ENIs)
	}
	for i, v := range after.VSwitches {
		if v.Available != before.VSwitches[i].Available {
			t.Fatalf("vSwitch %s has %d free addresses, want %d", v.ID, v.Available, before.VSwitches[i].Available)
		}
	}
}

func TestAllocateReleaseTeardownLeaveNothing(t *testing.T) {
	emu, c := setup(t)
	ctx := context.Background()
	before := emu.Snapshot()
	m := started(t, c)
	if m.Quota() != 3 || m.Trunk().Type != aliyun.TypeTrunk || m.Trunk().Status != aliyun.StatusInUse {
		t.Fatalf("quota %d trunk %+v", m.Quota(), m.Trunk())
	}
	// A second start (an agent restart) adopts the trunk instead of making another.
	if m2 := started(t, c); m2.Trunk().ID != m.Trunk().ID {
		t.Fatalf("restart made trunk %s, want the existing %s", m2.Trunk().ID, m.Trunk().ID)
	}

	seen := map[string]bool{}
	for i := range 3 {
		pod := fmt.Sprintf("default/p%d", i)
		mem, err := m.Allocate(ctx, pod, trunk.MemberRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if mem.VLAN != i+1 || !mem.IP.IsValid() || seen[mem.IP.String()] || mem.TrunkID != m.Trunk().ID || mem.TrunkMAC != m.Trunk().MAC {
			t.Fatalf("member %d = %+v", i, mem)
		}
		seen[mem.IP.String()] = true
		again, err := m.Allocate(ctx, pod, trunk.MemberRequest{})
		if err != nil || again.ENIID != mem.ENIID || again.VLAN != mem.VLAN {
			t.Fatalf("repeated allocate for %s = %+v, %v; want the same ENI %s", pod, again, err, mem.ENIID)
		}
	}
	// Past the quota: a quota error, and the ENI made for the attempt is gone again.
	n := len(emu.Snapshot().ENIs)
	if _, err := m.Allocate(ctx, "default/p3", trunk.MemberRequest{}); !errors.Is(err, aliyun.ErrQuota) {
		t.Fatalf("fourth member: %v, want ErrQuota", err)
	}
	if got := len(emu.Snapshot().ENIs); got != n {
		t.Fatalf("a refused member left an ENI behind: %d ENIs, want %d", got, n)
	}
	if err := m.Teardown(ctx); err == nil {
		t.Fatal("teardown with members left succeeded")
	}
	for i := range 3 {
		pod := fmt.Sprintf("default/p%d", i)
		if err := m.Release(ctx, pod); err != nil {
			t.Fatal(err)
		}
		if err := m.Release(ctx, pod); err != nil {
			t.Fatalf("second release of %s: %v", pod, err)
		}
	}
	if err := m.Teardown(ctx); err != nil {
		t.Fatal(err)
	}
	cleanCloud(t, emu, before)
}

// TestCrashMidAttachThenRetryAndGC: the agent dies while a member is attaching (its context
// ends); a new agent's Allocate for the same pod finds the same ENI through its ClientToken,
// and GC removes the member of a pod that is gone.
func TestCrashMidAttachThenRetryAndGC(t *testing.T) {
	emu, c := setup(t)
	before := emu.Snapshot()
	m := started(t, c)
	emu.SetDelays(ecsemu.TransitionDelays{Attach: ecsemu.Duration(20 * time.Millisecond), Detach: ecsemu.Duration(20 * time.Millisecond),
		MemberAttach: ecsemu.Duration(300 * time.Millisecond)})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	_, err := m.Allocate(ctx, "default/a", trunk.MemberRequest{})
	cancel()
	if err == nil {
		t.Fatal("allocate with a context that ended mid-attach succeeded")
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 100*time.Millisecond)
	_, err = m.Allocate(ctx2, "default/b", trunk.MemberRequest{})
	cancel2()
	if err == nil {
		t.Fatal("second interrupted allocate succeeded")
	}

	restarted := started(t, c)
	ctx = context.Background()
	a, err := restarted.Allocate(ctx, "default/a", trunk.MemberRequest{})
	if err != nil {
		t.Fatal(err)
	}
	members := 0
	for _, e := range emu.Snapshot().ENIs {
		if e.Trunk != "" {
			members++
		}
	}
	if members != 2 {
		t.Fatalf("%d members attached, want 2 (a retried, b orphaned): the retry must not create another ENI", members)
	}
	n, err := restarted.GC(ctx, func(pod string) bool { return pod == "default/a" })
	if err != nil || n != 1 {
		t.Fatalf("GC removed %d, %v; want the orphan of default/b", n, err)
	}
	if err := restarted.Release(ctx, "default/a"); err != nil {
		t.Fatal(err)
	}
	if err := restarted.Teardown(ctx); err != nil {
		t.Fatal(err)
	}
	if a.VLAN < 1 {
		t.Fatalf("retried member %+v has no VLAN", a)
	}
	cleanCloud(t, emu, before)
}

// TestBurstUnderFaults: 30% of all cloud calls fail with Throttling or InternalError while
// pods come and go concurrently; every pod gets a distinct address and VLAN, and releasing
// everything leaves the cloud as it was.
func TestBurstUnderFaults(t *testing.T) {
	emu, c := setup(t)
	before := emu.Snapshot()
	m := started(t, c)
	emu.InjectFault(ecsemu.Fault{Code: ecsemu.CodeThrottling, Rate: 0.15})
	emu.InjectFault(ecsemu.Fault{Code: ecsemu.CodeInternalError, Rate: 0.15})
	ctx := context.Background()
	for round := range 3 {
		var wg sync.WaitGroup
		got := make([]trunk.Member, 3)
		errs := make([]error, 3)
		for i := range 3 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				got[i], errs[i] = m.Allocate(ctx, fmt.Sprintf("ns/r%d-%d", round, i), trunk.MemberRequest{})
			}()
		}
		wg.Wait()
		ips, vlans := map[string]bool{}, map[int]bool{}
		for i := range 3 {
			if errs[i] != nil {
				t.Fatalf("round %d pod %d: %v", round, i, errs[i])
			}
			if ips[got[i].IP.String()] || vlans[got[i].VLAN] {
				t.Fatalf("round %d: duplicate address or VLAN: %+v", round, got)
			}
			ips[got[i].IP.String()], vlans[got[i].VLAN] = true, true
		}
		for i := range 3 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = m.Release(ctx, fmt.Sprintf("ns/r%d-%d", round, i))
			}()
		}
		wg.Wait()
		for i := range 3 {
			if errs[i] != nil {
				t.Fatalf("round %d release %d: %v", round, i, errs[i])
			}
		}
	}
	s := emu.Snapshot()
	if s.Errors[ecsemu.CodeThrottling] == 0 || s.Errors[ecsemu.CodeInternalError] == 0 {
		t.Fatalf("no faults fired (%v): the test proves nothing", s.Errors)
	}
	emu.ClearFaults()
	if err := m.Teardown(ctx); err != nil {
		t.Fatal(err)
	}
	cleanCloud(t, emu, before)
}

func TestStartRefusesTypesWithoutTrunking(t *testing.T) {
	cfg := ecsemu.TestConfig() // g7 types carry no trunk support
	_, ep := ecsemu.NewTestServer(t, cfg)
	c, err := aliyun.New(aliyun.Options{RegionID: ecsemu.TestRegion, Endpoint: ep,
		Credential: credential.Credential{AccessKeyID: ecsemu.TestAccessKeyID, AccessKeySecret: ecsemu.TestAccessKeySecret}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	err = trunk.New(c, opts(), nil).Start(context.Background())
	if !errors.Is(err, trunk.ErrNotSupported) {
		t.Fatalf("start on ecs.g7.large without trunking: %v, want ErrNotSupported", err)
	}
}

func TestWantsMember(t *testing.T) {
	for _, tc := range []struct {
		ann     map[string]string
		want    bool
		wantErr bool
	}{
		{nil, false, false},
		{map[string]string{trunk.AnnotationPodENI: "true"}, true, false},
		{map[string]string{trunk.AnnotationPodENI: "false"}, false, false},
		{map[string]string{trunk.AnnotationPodNetworking: "trunk-pods"}, true, false},
		{map[string]string{trunk.AnnotationPodENI: "yes please"}, false, true},
	} {
		got, err := trunk.WantsMember(tc.ann)
		if got != tc.want || (err != nil) != tc.wantErr {
			t.Errorf("WantsMember(%v) = %t, %v; want %t, error %t", tc.ann, got, err, tc.want, tc.wantErr)
		}
	}
}
