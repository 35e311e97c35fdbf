//go:build linux

// Command cni measures tern-cni end to end in the lab (real tern-agent, real plugin exec'd by
// libcni, real kernel): per daemon mode (ENIIP, VPC route) and emulator timing (fast: the
// lab's short delays; realistic: ecsemu.RealisticTiming, seconds per ENI attach and route
// entry), ADD latency with a warm pool, the time to start N pods on one node with a warm and
// with a cold pool, the route mode's node start, and cloud API calls per pod. It prints a
// Markdown table. Run as root: go run ./test/bench/cni [-timing fast,realistic] [-modes eniip,route,exclusive,trunk]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/lab"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench/cni:", err)
		os.Exit(1)
	}
}

type row struct{ name, value string }

func run() error {
	pods := flag.Int("pods", 100, "pods per scenario")
	conc := flag.Int("concurrency", 10, "parallel ADDs in the burst scenarios (a kubelet starts pods in parallel)")
	latency := flag.Duration("latency", 50*time.Millisecond, "emulated cloud API latency of the fast cold-pool scenario (realistic timing uses ecsemu.RealisticTiming's)")
	timings := flag.String("timing", "fast,realistic", "emulator timings to run: fast (the lab's short delays), realistic (ecsemu.RealisticTiming)")
	modes := flag.String("modes", "eniip,route,exclusive,trunk", "daemon modes to run: eniip, route (VPC route mode), exclusive (exclusive-ENI pods), trunk (member ENIs)")
	bin := flag.String("bin", "", "directory with tern-agent and tern-cni (default: build them)")
	flag.Parse()
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces, BPF)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	if *bin == "" {
		dir, err := os.MkdirTemp("", "tern-bench-bin-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		fmt.Fprintln(os.Stderr, "building tern-agent and tern-cni...")
		if err := lab.BuildBinaries(ctx, dir); err != nil {
			return err
		}
		*bin = dir
	}
	var rows []row
	for _, timing := range strings.Split(*timings, ",") {
		if timing != ecsemu.TimingFast && timing != ecsemu.TimingRealistic {
			return fmt.Errorf("-timing %q: want fast or realistic", timing)
		}
		for _, mode := range strings.Split(*modes, ",") {
			var (
				r   []row
				err error
			)
			switch mode {
			case "eniip":
				r, err = eniipScenarios(ctx, *bin, timing, *pods, *conc, *latency)
			case "route":
				r, err = routeScenarios(ctx, *bin, timing, *pods, *conc)
			case "exclusive":
				r, err = exclusiveScenarios(ctx, *bin, timing, *pods, *conc, *latency)
			case "trunk":
				r, err = trunkScenarios(ctx, *bin, timing, *pods, *conc, *latency)
			default:
				return fmt.Errorf("-modes %q: want eniip, route, exclusive or trunk", mode)
			}
			if err != nil {
				return fmt.Errorf("%s, %s timing: %w", mode, timing, err)
			}
			rows = append(rows, r...)
		}
	}
	fmt.Println("| measurement | value |")
	fmt.Println("|---|---:|")
	for _, r := range rows {
		fmt.Printf("| %s | %s |\n", r.name, r.value)
	}
	return nil
}

// eniipScenarios: ADD latency with a warm pool (one at a time and in parallel) and with a cold
// pool (every pod waits for the cloud), with cloud API calls per pod IP.
func eniipScenarios(ctx context.Context, bin, timing string, pods, conc int, latency time.Duration) ([]row, error) {
	var rows []row
	tag := "ENIIP, " + timing + " timing"
	// Warm pool: min_pool_size covers every pod, so no ADD waits for the cloud. Each scenario
	// gets a fresh lab so that one's refill or reclaim does not run into the next.
	warm := lab.Options{Nodes: 1, InstanceType: "ecs.g7.4xlarge", BinDir: bin, Timing: timing,
		ENIConf: lab.ENIConf{MinPoolSize: pods, MaxPoolSize: pods + 10}}
	err := withLab(ctx, warm, func(l *lab.Lab) error {
		if err := waitIdle(ctx, l, pods); err != nil {
			return err
		}
		lat, _, err := burst(ctx, l, "seq", pods, 1)
		if err != nil {
			return err
		}
		rows = append(rows, row{fmt.Sprintf("%s: ADD latency, warm pool, one at a time (%d pods): p50", tag, pods), ms(pct(lat, 50))},
			row{"  p99", ms(pct(lat, 99))})
		m, err := l.Node(0).Client().Metrics(ctx)
		if err != nil {
			return err
		}
		for _, path := range []string{"/v1/pods/allocate", "/v1/pods/attach"} {
			rows = append(rows, row{"  of which agent " + path + " (mean)", ms(meanOf(m, path))})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("warm pool: %w", err)
	}
	err = withLab(ctx, warm, func(l *lab.Lab) error {
		if err := waitIdle(ctx, l, pods); err != nil {
			return err
		}
		before := calls(l)
		lat, total, err := burst(ctx, l, "warm", pods, conc)
		if err != nil {
			return err
		}
		rows = append(rows, row{fmt.Sprintf("%s: %d pods on one node, warm pool, %d in parallel: total", tag, pods, conc), ms(total)},
			row{"  ADD latency p50 / p99", ms(pct(lat, 50)) + " / " + ms(pct(lat, 99))},
			row{"  cloud API calls per pod IP (background refill to min_pool_size)", fmt.Sprintf("%.2f", float64(calls(l)-before)/float64(pods))})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("warm pool: %w", err)
	}

	// Cold pool: nothing is pre-allocated; with fast timing every API call takes `latency`
	// longer, with realistic timing the emulator's realistic latency and delays apply.
	cold := lab.Options{Nodes: 1, InstanceType: "ecs.g7.4xlarge", BinDir: bin, Timing: timing,
		ENIConf: lab.ENIConf{MinPoolSize: 0, MaxPoolSize: 5}}
	what := "realistic delays"
	if timing == ecsemu.TimingFast {
		cold.Latency = latency
		what = fmt.Sprintf("%v API latency", latency)
	}
	err = withLab(ctx, cold, func(l *lab.Lab) error {
		before := calls(l)
		lat, total, err := burst(ctx, l, "cold", pods, conc)
		if err != nil {
			return err
		}
		n := calls(l) - before
		rows = append(rows, row{fmt.Sprintf("%s: %d pods on one node, cold pool, %s, %d in parallel: total", tag, pods, what, conc), ms(total)},
			row{"  ADD latency p50 / p99", ms(pct(lat, 50)) + " / " + ms(pct(lat, 99))},
			row{"  cloud API calls per pod IP", fmt.Sprintf("%.2f (%d calls)", float64(n)/float64(pods), n)})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("cold pool: %w", err)
	}
	return rows, nil
}

// routeScenarios: the VPC route mode has no pool: the node's start waits for its route entry
// (Pending → Available), then every ADD is local.
func routeScenarios(ctx context.Context, bin, timing string, pods, conc int) ([]row, error) {
	var rows []row
	tag := "VPC route, " + timing + " timing"
	o := lab.Options{Nodes: 1, InstanceType: "ecs.g7.4xlarge", BinDir: bin, Timing: timing, DaemonMode: agent.ModeVPC, DeferAgents: true}
	err := withLab(ctx, o, func(l *lab.Lab) error {
		t0 := time.Now()
		if err := l.Node(0).StartAgent(ctx); err != nil {
			return err
		}
		start := time.Since(t0)
		startCalls := calls(l)
		lat, total, err := burst(ctx, l, "route", pods, conc)
		if err != nil {
			return err
		}
		n := calls(l) - startCalls
		rows = append(rows, row{fmt.Sprintf("%s: agent start to ready (route entry created, Pending → Available)", tag), ms(start)},
			row{"  cloud API calls of the start", fmt.Sprint(startCalls)},
			row{fmt.Sprintf("  %d pods, %d in parallel: total", pods, conc), ms(total)},
			row{"  ADD latency p50 / p99", ms(pct(lat, 50)) + " / " + ms(pct(lat, 99))},
			row{"  cloud API calls per pod (route checks included)", fmt.Sprintf("%.2f (%d calls)", float64(n)/float64(pods), n)})
		return nil
	})
	return rows, err
}

func withLab(ctx context.Context, o lab.Options, fn func(*lab.Lab) error) error {
	l, err := lab.Up(ctx, o)
	if err != nil {
		return err
	}
	defer func() {
		if err := l.Down(); err != nil {
			fmt.Fprintln(os.Stderr, "lab down:", err)
		}
	}()
	return fn(l)
}

func waitIdle(ctx context.Context, l *lab.Lab, n int) error {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		st, err := l.Node(0).Client().State(ctx)
		if err != nil {
			return err
		}
		if st.Idle >= n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pool has %d idle addresses after 2 minutes, want %d", st.Idle, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// burst adds n pods, conc at a time, and returns each ADD's latency (retries included) and the
// wall time of the whole burst.
func burst(ctx context.Context, l *lab.Lab, prefix string, n, conc int) ([]time.Duration, time.Duration, error) {
	lat := make([]time.Duration, n)
	errs := make([]error, n)
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			t0 := time.Now()
			_, errs[i] = l.AddPod(ctx, 0, "bench", fmt.Sprintf("%s-%d", prefix, i))
			lat[i] = time.Since(t0)
		}()
	}
	wg.Wait()
	return lat, time.Since(start), errors.Join(errs...)
}

// meanOf reads the mean of tern_agent_api_request_duration_seconds for path from the
// Prometheus text exposition.
func meanOf(metrics, path string) time.Duration {
	var sum, count float64
	for _, line := range strings.Split(metrics, "\n") {
		var v float64
		switch {
		case strings.HasPrefix(line, `tern_agent_api_request_duration_seconds_sum{path="`+path+`"}`):
			fmt.Sscanf(line[strings.LastIndex(line, " ")+1:], "%g", &v)
			sum = v
		case strings.HasPrefix(line, `tern_agent_api_request_duration_seconds_count{path="`+path+`"}`):
			fmt.Sscanf(line[strings.LastIndex(line, " ")+1:], "%g", &v)
			count = v
		}
	}
	if count == 0 {
		return 0
	}
	return time.Duration(sum / count * float64(time.Second))
}

func calls(l *lab.Lab) int {
	n := 0
	for _, c := range l.Emulator().Snapshot().Calls {
		n += c
	}
	return n
}

func pct(d []time.Duration, p int) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := (len(s)*p + 99) / 100
	return s[max(0, min(len(s)-1, i-1))]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }
