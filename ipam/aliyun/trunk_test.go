package aliyun_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/test/ecsemu"
)

func trunkEmulator(t *testing.T) (*ecsemu.Emulator, *aliyun.Client) {
	t.Helper()
	cfg := ecsemu.TestConfig()
	cfg.SetTrunking("ecs.g7.large", 6) // 3 member ENIs
	emu, ep := ecsemu.NewTestServer(t, cfg)
	emu.SetDelays(ecsemu.TransitionDelays{Attach: ecsemu.Duration(30 * time.Millisecond), Detach: ecsemu.Duration(30 * time.Millisecond),
		Delete: ecsemu.Duration(10 * time.Millisecond), MemberAttach: ecsemu.Duration(20 * time.Millisecond)})
	return emu, newClient(t, ep, ecsemu.TestAccessKeySecret, 4)
}

// TestTrunkLifecycleThroughTheSDK: trunk create (idempotent by token) and attach, members
// attached with cloud-assigned VLAN ids despite throttling, detached, deleted; the cloud ends
// as it started.
func TestTrunkLifecycleThroughTheSDK(t *testing.T) {
	emu, c := trunkEmulator(t)
	ctx := context.Background()
	before := emu.Snapshot()

	lim, err := c.InstanceTypeLimits(ctx, "ecs.g7.large")
	if err != nil || aliyun.MemberQuota(lim) != 3 {
		t.Fatalf("limits %+v (member quota %d), %v; want 3 members", lim, aliyun.MemberQuota(lim), err)
	}
	req := aliyun.CreateENIRequest{VSwitchID: "vsw-test-a", SecurityGroups: []string{"sg-test"}, Tags: ourTags(), Token: "tok-trunk", Trunk: true}
	tr, err := c.CreateENI(ctx, req)
	if err != nil || tr.Type != aliyun.TypeTrunk {
		t.Fatalf("create trunk = %+v, %v", tr, err)
	}
	again, err := c.CreateENI(ctx, req)
	if err != nil || again.ID != tr.ID {
		t.Fatalf("retried trunk create = %s, %v; want %s", again.ID, err, tr.ID)
	}
	if _, err := c.AttachENI(ctx, tr.ID, "i-test-0001"); err != nil {
		t.Fatal(err)
	}

	// Throttling and InternalError on the member attach are retried with the same outcome.
	emu.InjectFault(ecsemu.Fault{Action: "AttachNetworkInterface", Code: ecsemu.CodeThrottling, Count: 1})
	emu.InjectFault(ecsemu.Fault{Action: "AttachNetworkInterface", Code: ecsemu.CodeInternalError, Count: 1})
	var members []aliyun.ENI
	for i := range 3 {
		m, err := c.CreateENI(ctx, aliyun.CreateENIRequest{VSwitchID: "vsw-test-a", SecurityGroups: []string{"sg-test"}, Tags: ourTags(), Token: "tok-member-" + string(rune('a'+i))})
		if err != nil {
			t.Fatal(err)
		}
		got, err := c.AttachMemberENI(ctx, m.ID, "i-test-0001", tr.ID)
		if err != nil {
			t.Fatalf("attach member %d: %v", i, err)
		}
		if got.Type != aliyun.TypeMember || got.TrunkID != tr.ID || got.VLAN != i+1 || got.Status != aliyun.StatusInUse {
			t.Fatalf("member %d = %+v; want InUse Member of %s with VLAN %d", i, got, tr.ID, i+1)
		}
		members = append(members, got)
	}
	if s := emu.Snapshot(); s.Errors[ecsemu.CodeThrottling] != 1 || s.Errors[ecsemu.CodeInternalError] != 1 {
		t.Fatalf("faults fired %v, want one of each (calls %v)", s.Errors, s.Calls)
	}
	// Attaching an already attached member again (a retry after a lost reply) is success.
	if got, err := c.AttachMemberENI(ctx, members[0].ID, "i-test-0001", tr.ID); err != nil || got.VLAN != 1 {
		t.Fatalf("repeated member attach = %+v, %v", got, err)
	}

	// The quota is the cloud's: a fourth member is refused as a quota error.
	extra, err := c.CreateENI(ctx, aliyun.CreateENIRequest{VSwitchID: "vsw-test-a", SecurityGroups: []string{"sg-test"}, Tags: ourTags(), Token: "tok-member-x"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.AttachMemberENI(ctx, extra.ID, "i-test-0001", tr.ID); !errors.Is(err, aliyun.ErrQuota) {
		t.Fatalf("fourth member: %v, want ErrQuota", err)
	}

	for _, m := range members {
		if err := c.DetachMemberENI(ctx, m.ID, "i-test-0001", tr.ID); err != nil {
			t.Fatal(err)
		}
		// Detaching again is success.
		if err := c.DetachMemberENI(ctx, m.ID, "i-test-0001", tr.ID); err != nil {
			t.Fatalf("second detach of %s: %v", m.ID, err)
		}
		if err := c.DeleteENI(ctx, m.ID); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.DeleteENI(ctx, extra.ID); err != nil {
		t.Fatal(err)
	}
	if err := c.DetachENI(ctx, tr.ID, "i-test-0001"); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteENI(ctx, tr.ID); err != nil {
		t.Fatal(err)
	}
	after := emu.Snapshot()
	if len(after.ENIs) != len(before.ENIs) {
		t.Fatalf("%d ENIs left, want %d: %+v", len(after.ENIs), len(before.ENIs), after.ENIs)
	}
}

func TestAttachMemberNeedsTrunk(t *testing.T) {
	_, c := trunkEmulator(t)
	ctx := context.Background()
	m, err := c.CreateENI(ctx, aliyun.CreateENIRequest{VSwitchID: "vsw-test-a", SecurityGroups: []string{"sg-test"}, Token: "tok-m"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.AttachMemberENI(ctx, m.ID, "i-test-0001", ""); err == nil {
		t.Fatal("attach with no trunk ID succeeded")
	}
	// A trunk that is not attached: the cloud's wrong-state answer surfaces as ErrInvalidState
	// once the wait sees the member stay Available (not forever).
	tr, err := c.CreateENI(ctx, aliyun.CreateENIRequest{VSwitchID: "vsw-test-a", SecurityGroups: []string{"sg-test"}, Token: "tok-t", Trunk: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx2, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if _, err := c.AttachMemberENI(ctx2, m.ID, "i-test-0001", tr.ID); err == nil {
		t.Fatal("member attach to a detached trunk succeeded")
	}
}
