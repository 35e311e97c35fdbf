package aliyun_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/credential"
	"github.com/tern-net/tern/test/ecsemu"
)

func newClient(t *testing.T, endpoint, secret string, attempts int) *aliyun.Client {
	t.Helper()
	c, err := aliyun.New(aliyun.Options{
		RegionID:     ecsemu.TestRegion,
		Credential:   credential.Credential{AccessKeyID: ecsemu.TestAccessKeyID, AccessKeySecret: secret},
		Endpoint:     endpoint,
		PollInterval: 5 * time.Millisecond,
		WaitTimeout:  5 * time.Second,
		Backoff:      aliyun.Backoff{Initial: time.Millisecond, Max: 5 * time.Millisecond, Multiplier: 2, Jitter: 0.5, MaxAttempts: attempts},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func ourTags() map[string]string { return map[string]string{"creator": "tern", "tern.io/node": "n1"} }

func TestENILifecycleThroughTheSDK(t *testing.T) {
	emu, ep := ecsemu.NewTestServer(t, ecsemu.TestConfig())
	emu.SetDelays(ecsemu.TransitionDelays{Attach: ecsemu.Duration(40 * time.Millisecond), Detach: ecsemu.Duration(40 * time.Millisecond)})
	// The SDK would send even loopback calls to a proxy; the client must not.
	t.Setenv("HTTP_PROXY", "http://127.0.0.1:1")
	c := newClient(t, ep, ecsemu.TestAccessKeySecret, 3)
	ctx := context.Background()

	lim, err := c.InstanceTypeLimits(ctx, "ecs.g7.large")
	if err != nil || lim.ENIs != 3 || lim.IPsPerENI != 6 {
		t.Fatalf("limits = %+v, %v", lim, err)
	}
	inst, err := c.Instance(ctx, "i-test-0001")
	if err != nil || inst.ZoneID != "cn-hangzhou-h" || inst.Type != "ecs.g7.large" || inst.PrimaryIP.String() != "192.168.1.10" {
		t.Fatalf("instance = %+v, %v", inst, err)
	}

	req := aliyun.CreateENIRequest{VSwitchID: "vsw-test-a", SecurityGroups: []string{"sg-test"}, SecondaryIPs: 2, Tags: ourTags(), Token: "tok-create-1"}
	eni, err := c.CreateENI(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if len(eni.Secondary) != 2 || !eni.PrimaryIP.IsValid() || eni.MAC == "" {
		t.Fatalf("created %+v", eni)
	}
	// The same token is the same logical create: the same ENI comes back, no second one.
	again, err := c.CreateENI(ctx, req)
	if err != nil || again.ID != eni.ID {
		t.Fatalf("retried create = %s, %v; want %s", again.ID, err, eni.ID)
	}

	att, err := c.AttachENI(ctx, eni.ID, "i-test-0001")
	if err != nil || att.Status != aliyun.StatusInUse || att.InstanceID != "i-test-0001" {
		t.Fatalf("attach returned %+v, %v; want InUse on i-test-0001 after the async transition", att, err)
	}

	ips, err := c.AssignPrivateIPs(ctx, eni.ID, 3, "tok-assign-1")
	if err != nil || len(ips) != 3 {
		t.Fatalf("assign = %v, %v", ips, err)
	}
	ips2, err := c.AssignPrivateIPs(ctx, eni.ID, 3, "tok-assign-1")
	if err != nil || len(ips2) != 3 || ips2[0] != ips[0] {
		t.Fatalf("retried assign with the same token = %v, %v; want %v", ips2, err, ips)
	}
	listed, err := c.ListENIs(ctx, aliyun.ENIFilter{Tags: ourTags(), InstanceID: "i-test-0001"})
	if err != nil || len(listed) != 1 || len(listed[0].Secondary) != 5 {
		t.Fatalf("list by tags = %+v, %v; want one ENI with 5 secondary IPs", listed, err)
	}

	// Unassigning a set where one address is already gone still removes the rest.
	if err := c.UnassignPrivateIPs(ctx, eni.ID, ips[:1]); err != nil {
		t.Fatal(err)
	}
	if err := c.UnassignPrivateIPs(ctx, eni.ID, ips); err != nil {
		t.Fatalf("unassign with one already gone: %v", err)
	}
	s, _ := emu.Snapshot().ENI(eni.ID)
	if len(s.IPs) != 3 {
		t.Fatalf("after unassign the ENI has %v, want primary + 2", s.IPs)
	}

	if err := c.DetachENI(ctx, eni.ID, "i-test-0001"); err != nil {
		t.Fatal(err)
	}
	if s, _ := emu.Snapshot().ENI(eni.ID); s.Status != aliyun.StatusAvailable {
		t.Fatalf("after detach status %s", s.Status)
	}
	if err := c.DeleteENI(ctx, eni.ID); err != nil {
		t.Fatal(err)
	}
	if _, ok := emu.Snapshot().ENI(eni.ID); ok {
		t.Fatal("ENI still exists after DeleteENI")
	}
	if err := c.DeleteENI(ctx, eni.ID); err != nil {
		t.Fatalf("deleting a deleted ENI: %v", err)
	}

	vs, err := c.VSwitches(ctx, []string{"vsw-test-a"})
	if err != nil || len(vs) != 1 || vs[0].CIDR.String() != "192.168.1.0/24" || vs[0].Available <= 0 {
		t.Fatalf("vswitches = %+v, %v", vs, err)
	}
	// DescribeVSwitches answers an unknown ID with an empty list, not an error code: the
	// client must still call it what it is, a bad eni_conf.
	_, err = c.VSwitches(ctx, []string{"vsw-test-a", "vsw-nobody-made"})
	if !errors.Is(err, aliyun.ErrBadVSwitch) || !strings.Contains(err.Error(), "vsw-nobody-made") {
		t.Fatalf("an unknown vSwitch: %v; want ErrBadVSwitch naming it", err)
	}
}

// TestWaitPollsThroughFailedListings: an attach whose wait meets listings that fail with
// Throttling or InternalError past the call's own retries still completes (the failures say
// nothing about the ENI); a listing refused for want of permission ends the wait at once.
func TestWaitPollsThroughFailedListings(t *testing.T) {
	emu, ep := ecsemu.NewTestServer(t, ecsemu.TestConfig())
	emu.SetDelays(ecsemu.TransitionDelays{Attach: ecsemu.Duration(30 * time.Millisecond), Detach: ecsemu.Duration(30 * time.Millisecond)})
	c := newClient(t, ep, ecsemu.TestAccessKeySecret, 2)
	ctx := context.Background()
	create := func(token string) aliyun.ENI {
		eni, err := c.CreateENI(ctx, aliyun.CreateENIRequest{VSwitchID: "vsw-test-a", SecurityGroups: []string{"sg-test"}, Tags: ourTags(), Token: token})
		if err != nil {
			t.Fatal(err)
		}
		return eni
	}
	const describe = "DescribeNetworkInterfaces"
	eni := create("tok-wait-1")
	// Six failures in a row: three listings of two attempts each fail before one answers.
	emu.InjectFault(ecsemu.Fault{Action: describe, Code: ecsemu.CodeThrottling, Count: 3})
	emu.InjectFault(ecsemu.Fault{Action: describe, Code: ecsemu.CodeInternalError, Count: 3})
	att, err := c.AttachENI(ctx, eni.ID, "i-test-0001")
	if err != nil || att.Status != aliyun.StatusInUse {
		t.Fatalf("attach through failing listings: %+v, %v; want InUse", att, err)
	}
	if e := emu.Snapshot().Errors; e[ecsemu.CodeThrottling] != 3 || e[ecsemu.CodeInternalError] != 3 {
		t.Fatalf("faults fired %v, want 3 Throttling and 3 InternalError: the wait met no failed listing", e)
	}

	other := create("tok-wait-2")
	emu.InjectFault(ecsemu.Fault{Action: describe, Code: "Forbidden.RAM", Status: 403})
	start := time.Now()
	_, err = c.AttachENI(ctx, other.ID, "i-test-0001")
	if !errors.Is(err, aliyun.ErrForbidden) {
		t.Fatalf("attach whose listing is forbidden: %v; want ErrForbidden", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("a forbidden listing ended the wait after %s; want at once, not at the 5 s WaitTimeout", d)
	}
	emu.ClearFaults()
}

func TestErrorsMapToCauses(t *testing.T) {
	emu, ep := ecsemu.NewTestServer(t, ecsemu.TestConfig())
	ctx := context.Background()

	bad := newClient(t, ep, "wrong-secret", 3)
	_, err := bad.Instance(ctx, "i-test-0001")
	var ae *aliyun.APIError
	if !errors.Is(err, aliyun.ErrCredentials) || !errors.As(err, &ae) || ae.Code != "SignatureDoesNotMatch" || ae.RequestID == "" || ae.Attempts != 1 {
		t.Fatalf("wrong secret: %v (%+v); want ErrCredentials with code and RequestId, not retried", err, ae)
	}

	c := newClient(t, ep, ecsemu.TestAccessKeySecret, 4)
	tests := []struct {
		code  string
		cause error
	}{
		{ecsemu.CodeVSwitchIPNotEnough, aliyun.ErrVSwitchExhausted},
		{ecsemu.CodeQuotaPrivateIP, aliyun.ErrVSwitchExhausted},
		{ecsemu.CodeEniPerInstanceLimit, aliyun.ErrQuota},
		{ecsemu.CodeIpv4CountExceeded, aliyun.ErrQuota},
		{"Forbidden.RAM", aliyun.ErrForbidden},
		{ecsemu.CodeEniNotFound, aliyun.ErrNotFound},
		{ecsemu.CodeInvalidEniState, aliyun.ErrInvalidState},
	}
	for _, tc := range tests {
		emu.InjectFault(ecsemu.Fault{Action: "AssignPrivateIpAddresses", Code: tc.code, Count: 1})
		_, err := c.AssignPrivateIPs(ctx, "eni-x", 1, "tok-"+tc.code)
		if !errors.Is(err, tc.cause) || !errors.As(err, &ae) || ae.Code != tc.code {
			t.Errorf("%s: err = %v; want cause %v", tc.code, err, tc.cause)
		}
		emu.ClearFaults()
	}

	// Throttling is retried with backoff; persistent throttling ends as ErrThrottled.
	emu.InjectFault(ecsemu.Fault{Action: "DescribeInstances", Code: ecsemu.CodeThrottling, Count: 3})
	if _, err := c.Instance(ctx, "i-test-0001"); err != nil {
		t.Fatalf("3 throttles with 4 attempts: %v", err)
	}
	emu.InjectFault(ecsemu.Fault{Action: "DescribeInstances", Code: ecsemu.CodeInternalError})
	_, err = c.Instance(ctx, "i-test-0001")
	if !errors.Is(err, aliyun.ErrTransient) || !errors.As(err, &ae) || ae.Attempts != 4 || !strings.Contains(err.Error(), "after 4 attempts") {
		t.Fatalf("persistent InternalError: %v", err)
	}
	emu.ClearFaults()

	if got := counter(t, c, "DescribeInstances", ecsemu.CodeThrottling); got != 3 {
		t.Errorf("tern_cloud_api_calls_total{DescribeInstances,Throttling} = %v, want 3", got)
	}
	if got := counter(t, c, "DescribeInstances", "ok"); got != 1 {
		t.Errorf("tern_cloud_api_calls_total{DescribeInstances,ok} = %v, want 1", got)
	}
}

func counter(t *testing.T, c *aliyun.Client, action, result string) float64 {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(c.Collectors()...)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "tern_cloud_api_calls_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if label(m, "action") == action && label(m, "result") == result {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// TestAddressLimitErrorsFromTheEmulator drives the two "no more addresses" errors for real (not
// injected): an ENI past its own limit answers InvalidOperation.Ipv4CountExceeded (ErrQuota:
// this ENI is full, another may not be), a vSwitch out of addresses answers
// QuotaExceeded.PrivateIpAddress with HTTP 400 (ErrVSwitchExhausted: use another vSwitch).
func TestAddressLimitErrorsFromTheEmulator(t *testing.T) {
	cfg := ecsemu.TestConfig()
	cfg.VSwitches = append(cfg.VSwitches, ecsemu.VSwitchConfig{ID: "vsw-tiny", Zone: "cn-hangzhou-h", CIDR: "192.168.3.0/29"})
	_, ep := ecsemu.NewTestServer(t, cfg)
	c := newClient(t, ep, ecsemu.TestAccessKeySecret, 2)
	ctx := context.Background()

	// An unattached ENI holds at most 50 addresses, its primary included.
	e, err := c.CreateENI(ctx, aliyun.CreateENIRequest{VSwitchID: "vsw-test-b", SecurityGroups: []string{"sg-test"}, SecondaryIPs: 10, Token: "tok-big"})
	if err != nil {
		t.Fatal(err)
	}
	for i, n := range []int{10, 10, 10, 9} {
		if _, err := c.AssignPrivateIPs(ctx, e.ID, n, fmt.Sprintf("tok-fill-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	_, err = c.AssignPrivateIPs(ctx, e.ID, 1, "tok-one-more")
	var ae *aliyun.APIError
	if !errors.Is(err, aliyun.ErrQuota) || errors.Is(err, aliyun.ErrVSwitchExhausted) || !errors.As(err, &ae) || ae.Code != "InvalidOperation.Ipv4CountExceeded" {
		t.Fatalf("51st address on an unattached ENI: %v; want ErrQuota with InvalidOperation.Ipv4CountExceeded", err)
	}

	// A /29 has 4 usable addresses: the ENI's primary and 3 secondaries.
	tiny, err := c.CreateENI(ctx, aliyun.CreateENIRequest{VSwitchID: "vsw-tiny", SecurityGroups: []string{"sg-test"}, SecondaryIPs: 3, Token: "tok-tiny"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.AssignPrivateIPs(ctx, tiny.ID, 1, "tok-tiny-more")
	if !errors.Is(err, aliyun.ErrVSwitchExhausted) || !errors.As(err, &ae) || ae.Code != "QuotaExceeded.PrivateIpAddress" || ae.HTTPStatus != 400 {
		t.Fatalf("assign on an exhausted vSwitch: %v (%+v); want ErrVSwitchExhausted with QuotaExceeded.PrivateIpAddress, HTTP 400", err, ae)
	}
}
