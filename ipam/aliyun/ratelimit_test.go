package aliyun_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/credential"
	"github.com/tern-net/tern/test/ecsemu"
)

// A call the rate limiter cannot start before the caller's deadline ends as a call the
// deadline cut short: ctx.Err() is set when it returns and the error wraps it. Callers roll
// back only on failures seen with ctx alive; rate.Limiter refuses such a wait at once, ctx
// still live, and an ADD then took an attach still under way for a failure and freed a
// member slot the cloud still held (TestMemberENIUnfinishedAddReleasedAtDel, 1 run in ~40).
func TestRateLimitedCallPastTheDeadlineEndsWithTheContext(t *testing.T) {
	_, ep := ecsemu.NewTestServer(t, ecsemu.TestConfig())
	c, err := aliyun.New(aliyun.Options{
		RegionID:   ecsemu.TestRegion,
		Credential: credential.Credential{AccessKeyID: ecsemu.TestAccessKeyID, AccessKeySecret: ecsemu.TestAccessKeySecret},
		Endpoint:   ep,
		// One DescribeNetworkInterfaces every 10 s: the second call must wait ~10 s.
		RateLimits: map[string]aliyun.RateLimit{"DescribeNetworkInterfaces": {PerSecond: 0.1, Burst: 1}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	if _, err := c.ListENIs(context.Background(), aliyun.ENIFilter{}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = c.ListENIs(ctx, aliyun.ENIFilter{})
	if err == nil {
		t.Fatal("a second call within the limiter's 10 s interval succeeded inside a 200 ms deadline")
	}
	if ctx.Err() == nil {
		t.Fatalf("the call returned %v after %v with its context still live; callers would take it for a failure the cloud reported", err, time.Since(start))
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error %v does not wrap context.DeadlineExceeded", err)
	}
}
