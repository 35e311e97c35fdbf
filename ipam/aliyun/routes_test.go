package aliyun_test

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/credential"
	"github.com/tern-net/tern/test/ecsemu"
)

// TestRouteEntryLifecycleThroughTheSDK drives the VPC route table API of the emulator through
// the real SDK: table discovery, a Pending entry that turns Available, the table refusing a
// second change while one is Pending (retried by the client), token replay, the documented
// refusals (duplicate, vSwitch overlap, quota) and deletion.
func TestRouteEntryLifecycleThroughTheSDK(t *testing.T) {
	cfg := ecsemu.TestConfig()
	cfg.AddInstance("i-test-0002", "ecs.g7.large", "vsw-test-a", "192.168.1.11")
	cfg.RouteEntryQuota = 2
	emu, ep := ecsemu.NewTestServer(t, cfg)
	// Transitions wait for FinishTransitions: no test step depends on a delay.
	emu.SetDelays(ecsemu.TransitionDelays{Route: ecsemu.Duration(time.Hour), RouteDelete: ecsemu.Duration(time.Hour)})
	c, err := aliyun.New(aliyun.Options{
		RegionID: ecsemu.TestRegion, Endpoint: ep, PollInterval: 5 * time.Millisecond, WaitTimeout: 5 * time.Second,
		Credential: credential.Credential{AccessKeyID: ecsemu.TestAccessKeyID, AccessKeySecret: ecsemu.TestAccessKeySecret},
		Backoff:    aliyun.Backoff{Initial: time.Millisecond, Max: 5 * time.Millisecond, Multiplier: 2, Jitter: 0.5, MaxAttempts: 3},
		// The default budget for route changes (2/s) would make this test wait seconds.
		RateLimits: map[string]aliyun.RateLimit{"CreateRouteEntry": {PerSecond: 1000, Burst: 100}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	ctx := context.Background()

	table, err := c.SystemRouteTable(ctx, "vpc-test")
	if err != nil || table != emu.RouteTableID() {
		t.Fatalf("system route table = %q, %v; want %q", table, err, emu.RouteTableID())
	}
	if _, err := c.SystemRouteTable(ctx, "vpc-other"); !errors.Is(err, aliyun.ErrNotFound) {
		t.Fatalf("route table of an unknown VPC: %v, want ErrNotFound", err)
	}
	pod1 := netip.MustParsePrefix("192.168.128.0/24")
	req := aliyun.CreateRouteRequest{TableID: table, Destination: pod1, InstanceID: "i-test-0001", Name: "tern-n1", Token: "tok-route-1"}
	id, err := c.CreateRouteEntry(ctx, req)
	if err != nil || id == "" {
		t.Fatalf("create: %q, %v", id, err)
	}
	es, err := c.RouteEntries(ctx, table, aliyun.RouteFilter{Destination: pod1})
	if err != nil || len(es) != 1 || es[0].Status != aliyun.RouteStatusPending || es[0].NextHopID != "i-test-0001" || es[0].Name != "tern-n1" {
		t.Fatalf("entries right after create = %+v, %v; want one Pending entry to i-test-0001", es, err)
	}
	// The same token again: the same entry, nothing new.
	if again, err := c.CreateRouteEntry(ctx, req); err != nil || again != id {
		t.Fatalf("replayed create = %q, %v; want %q", again, err, id)
	}
	// A second node's entry while the first is Pending: IncorrectRouteEntryStatus on every
	// attempt, a transient error the client retried.
	pod2 := netip.MustParsePrefix("192.168.129.0/24")
	req2 := aliyun.CreateRouteRequest{TableID: table, Destination: pod2, InstanceID: "i-test-0002", Token: "tok-route-2"}
	_, err = c.CreateRouteEntry(ctx, req2)
	if !errors.Is(err, aliyun.ErrTransient) || !errors.As(err, new(*aliyun.APIError)) {
		t.Fatalf("second create while the first is Pending: %v, want a retried IncorrectRouteEntryStatus", err)
	}
	if n := emu.Snapshot().Errors[ecsemu.CodeIncorrectRouteStatus]; n != 3 {
		t.Fatalf("%d IncorrectRouteEntryStatus replies, want 3 (one per attempt)", n)
	}
	emu.FinishTransitions()
	if _, err := c.CreateRouteEntry(ctx, req2); err != nil {
		t.Fatalf("second create once the table is stable: %v", err)
	}
	emu.FinishTransitions()
	e1, err := c.WaitRouteEntry(ctx, table, pod1, aliyun.RouteWait{Present: true})
	if err != nil || e1.ID != id || e1.Status != aliyun.RouteStatusAvailable {
		t.Fatalf("wait for Available: %+v, %v", e1, err)
	}
	if _, err := c.WaitRouteEntry(ctx, table, pod2, aliyun.RouteWait{Present: true}); err != nil {
		t.Fatal(err)
	}

	// The documented refusals.
	_, err = c.CreateRouteEntry(ctx, aliyun.CreateRouteRequest{TableID: table, Destination: pod1, InstanceID: "i-test-0002", Token: "tok-dup"})
	if !errors.Is(err, aliyun.ErrConflict) {
		t.Fatalf("duplicate destination: %v, want ErrConflict", err)
	}
	_, err = c.CreateRouteEntry(ctx, aliyun.CreateRouteRequest{TableID: table, Destination: netip.MustParsePrefix("192.168.1.128/25"), InstanceID: "i-test-0001", Token: "tok-vsw"})
	if !errors.Is(err, aliyun.ErrBadRoute) {
		t.Fatalf("destination inside a vSwitch: %v, want ErrBadRoute", err)
	}
	_, err = c.CreateRouteEntry(ctx, aliyun.CreateRouteRequest{TableID: table, Destination: netip.MustParsePrefix("192.168.130.0/24"), InstanceID: "i-test-0001", Token: "tok-quota"})
	var ae *aliyun.APIError
	if !errors.Is(err, aliyun.ErrQuota) || !errors.As(err, &ae) || ae.Code != ecsemu.CodeRouteQuotaExceeded {
		t.Fatalf("third entry with a quota of 2: %v, want QuotaExceeded", err)
	}

	if err := c.DeleteRouteEntry(ctx, table, id); err != nil {
		t.Fatal(err)
	}
	if es, _ := c.RouteEntries(ctx, table, aliyun.RouteFilter{Destination: pod1}); len(es) != 1 || es[0].Status != ecsemu.RouteStatusDeleting {
		t.Fatalf("entry right after delete = %+v, want it listed as Deleting", es)
	}
	emu.FinishTransitions()
	if _, err := c.WaitRouteEntry(ctx, table, pod1, aliyun.RouteWait{}); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteRouteEntry(ctx, table, id); err != nil {
		t.Fatalf("deleting a deleted entry: %v, want success", err)
	}
	rs := emu.Snapshot().Routes
	if len(rs) != 1 || rs[0].Destination != pod2.String() || rs[0].NextHopID != "i-test-0002" || rs[0].Status != ecsemu.RouteStatusAvailable {
		t.Fatalf("route table at the end = %+v, want only %s → i-test-0002", rs, pod2)
	}
}
