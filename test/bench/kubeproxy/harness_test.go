package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/test/k8s/controlplane"
)

// TestHarnessSmoke runs the whole benchmark at 1 and 10 Services, once, with short runs, so
// the harness cannot rot: every datapath must carry every kind of traffic on both paths (a
// failed connection fails the run), every proxy must serve the sentinel of each size, and the
// report must name every row.
func TestHarnessSmoke(t *testing.T) {
	testutil.RequirePrivileged(t)
	if _, err := controlplane.BinDir(); err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	p := params{sizes: []int{1, 10}, reps: 1, dur: 300 * time.Millisecond, streamDur: 300 * time.Millisecond,
		connWorkers: 2, rrConns: 2, workers: 8, convergeTimeout: 2 * time.Minute}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	res, err := run(ctx, p, "", t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range p.sizes {
		for _, path := range []string{pathClusterIP, pathNodePort} {
			for _, kind := range []string{kindConn, kindRR, kindStream} {
				for _, dp := range datapaths {
					if dp.nodePortOnly && path != pathNodePort {
						continue
					}
					m, ok := res.median(path, kind, dp.key, n)
					if !ok || m.Value <= 0 {
						t.Errorf("%d Services, %s %s via %s: no positive median (%+v)", n, path, kind, dp.key, m)
					}
					if kind == kindRR && (m.P50us <= 0 || m.P99us < m.P50us) {
						t.Errorf("%d Services, %s rr via %s: p50 %.0f µs, p99 %.0f µs", n, path, dp.key, m.P50us, m.P99us)
					}
				}
			}
		}
	}
	if len(res.Sizes) != 2 {
		t.Fatalf("%d sizes recorded, want 2", len(res.Sizes))
	}
	for _, name := range []string{"tern agent", "tern agent, no Services", "kube-proxy iptables", "kube-proxy nftables"} {
		if mb := res.Sizes[1].RSS[name]; mb < 5 {
			t.Errorf("RSS of %s is %.1f MB: not a live process's", name, mb)
		}
	}
	md := res.markdown()
	for _, row := range []string{"| 10 | tern |", "| 10 | kube-proxy iptables |", "| 10 | kube-proxy nftables |", "| 10 | no Service |", "| 10 | no Service, through node-1 |"} {
		if !strings.Contains(md, row) {
			t.Errorf("report lacks a row starting %q:\n%s", row, md)
		}
	}
	t.Log("\n" + md)
}
