package trunk_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/credential"
	"github.com/tern-net/tern/ipam/trunk"
	"github.com/tern-net/tern/test/ecsemu"
)

const helperEnv = "TERN_TRUNK_BURST_ENDPOINT"

// TestBurstHelper is not a test: TestKill9DuringBurst runs the test binary with it as a
// separate agent process that allocates and releases member ENIs until it is killed.
func TestBurstHelper(t *testing.T) {
	ep := os.Getenv(helperEnv)
	if ep == "" {
		t.Skip("helper process of TestKill9DuringBurst")
	}
	c, err := aliyun.New(aliyun.Options{RegionID: ecsemu.TestRegion, Endpoint: ep, PollInterval: 5 * time.Millisecond,
		Credential: credential.Credential{AccessKeyID: ecsemu.TestAccessKeyID, AccessKeySecret: ecsemu.TestAccessKeySecret}})
	if err != nil {
		t.Fatal(err)
	}
	m := trunk.New(c, opts(), nil)
	ctx := context.Background()
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for round := 0; ; round++ {
				pod := fmt.Sprintf("burst/p%d-%d", i, round)
				if mem, err := m.Allocate(ctx, pod, trunk.MemberRequest{}); err == nil {
					fmt.Printf("allocated %s %s\n", pod, mem.IP)
				}
				_ = m.Release(ctx, pod)
			}
		}()
	}
	wg.Wait()
}

// TestKill9DuringBurst: an agent process allocating and releasing member ENIs concurrently is
// killed with SIGKILL mid-burst; a new agent's GC (no pod alive) and teardown leave the cloud
// exactly as it was, and no address was ever held twice.
func TestKill9DuringBurst(t *testing.T) {
	emu, c, ep := setupEndpoint(t)
	before := emu.Snapshot()
	emu.SetDelays(ecsemu.TransitionDelays{Attach: ecsemu.Duration(20 * time.Millisecond), Detach: ecsemu.Duration(20 * time.Millisecond),
		Delete: ecsemu.Duration(10 * time.Millisecond), MemberAttach: ecsemu.Duration(40 * time.Millisecond)})

	cmd := exec.Command(os.Args[0], "-test.run=^TestBurstHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"="+ep)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	lines := bufio.NewScanner(out)
	allocated := 0
	for allocated < 6 && lines.Scan() {
		if strings.HasPrefix(lines.Text(), "allocated ") {
			allocated++
		}
	}
	if allocated < 6 {
		t.Fatalf("the helper allocated %d members before its output ended: %v", allocated, lines.Err())
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()

	// Whatever the kill left (members attaching, attached, detaching, created but never
	// attached), one address per ENI and none shared.
	seen := map[string]string{}
	left := map[string]int{}
	for _, e := range emu.Snapshot().ENIs {
		left[e.Type+"/"+e.Status]++
		for _, ip := range e.IPs {
			if other, dup := seen[ip]; dup {
				t.Fatalf("address %s on both %s and %s", ip, other, e.ID)
			}
			seen[ip] = e.ID
		}
	}

	t.Logf("after SIGKILL the cloud holds %v", left)
	m := started(t, c)
	ctx := context.Background()
	if _, err := m.GC(ctx, func(string) bool { return false }); err != nil {
		t.Fatal(err)
	}
	// A member the killed agent created but never attached is Available with our tags; GC
	// deletes it too. Deletes are asynchronous: wait for the cloud to finish them.
	emu.FinishTransitions()
	if err := m.Teardown(ctx); err != nil {
		t.Fatal(err)
	}
	emu.FinishTransitions()
	cleanCloud(t, emu, before)
}
