// Command datapath measures the per-packet cost of the pod programs with BPF_PROG_TEST_RUN:
// the current datapath (v2) and the first layout (v1, loader/testdata/v1) side by side in
// one run, with a do-nothing tc program as the baseline. It prints a Markdown report (see
// docs/benchmarks.md) and can draw docs/img/datapath.png.
//
// The frames are generated before measuring: hundreds of thousands of flows over random
// VIPs per datapath, opened through the programs themselves (SYN through from-pod, SYN-ACK
// through to-pod), so the conntrack and service maps hold far more than the last-level
// cache. Each frame runs once per call (Repeat=1: with Repeat the kernel reuses one skb and
// a DNAT would turn the second run into other traffic) and once per round, and every run's
// verdict and output frame are checked, so a number is never the cost of some other path.
// The kernel's own per-run duration is used; the no-op program pays the same test-run
// machinery and clock reads, so "own" (over no-op) is the program's cost.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/loader"
)

func main() {
	p := params{}
	sizes := flag.String("services", "1,1000,100000", "numbers of Services, comma separated; the scale ratio compares the last with the first")
	flag.IntVar(&p.fanout, "fanout", 50, "frontends sharing each backend in the shared-backend rows (v2)")
	flag.IntVar(&p.v1Fanout, "v1-fanout", 8, "the same for v1, whose reverse-NAT index holds at most 8")
	flag.IntVar(&p.flows, "flows", 250000, "established service flows per datapath, over random VIPs")
	flag.IntVar(&p.nonSvc, "non-service", 250000, "established non-service flows per datapath")
	flag.IntVar(&p.newFlows, "new", 50000, "new service flows per datapath per round")
	flag.IntVar(&p.rounds, "rounds", 5, "rounds; medians are over rounds")
	setups := flag.Int("setups", 1, "independent setups (fresh maps, traffic seeded seed, seed+1, ...); the ratios are also reported as their median over setups")
	flag.StringVar(&p.v1Object, "v1", "loader/testdata/v1/pod_bpfel.o", "the v1 pod object")
	flag.Uint64Var(&p.seed, "seed", 1, "seed of the traffic generator")
	fwd := flag.String("forwarding", "redirect", "v2 forward stage: redirect (the default) or stack (the stage off)")
	cpu := flag.Int("cpu", 0, "CPU to run on (v1's conntrack has per-CPU LRU lists)")
	png := flag.String("png", "", "also draw the medians into this PNG file")
	flag.Parse()
	p.forwarding = loader.Forwarding(*fwd)
	for _, s := range strings.Split(*sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			fmt.Fprintf(os.Stderr, "datapath bench: -services %q: %q is not a positive number\n", *sizes, s)
			os.Exit(2)
		}
		p.sizes = append(p.sizes, n)
	}
	if *setups < 1 || p.fanout < 2 || p.v1Fanout < 2 || p.v1Fanout > v1MaxFrontends || p.rounds < 1 || p.flows < 1 || p.nonSvc < 1 || p.newFlows < 1 {
		fmt.Fprintf(os.Stderr, "datapath bench: need -fanout >= 2, 2 <= -v1-fanout <= %d, and -rounds, -flows, -non-service, -new >= 1\n", v1MaxFrontends)
		os.Exit(2)
	}
	command := "go run ./test/bench/datapath " + strings.Join(os.Args[1:], " ")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, p, *setups, *cpu, *png, command); err != nil {
		fmt.Fprintln(os.Stderr, "datapath bench:", err)
		stop()
		os.Exit(1)
	}
}

// pinCPU keeps this goroutine on one OS thread on one CPU: every insert lands in the same
// per-CPU LRU list of v1's conntrack, and rounds do not migrate between CPUs.
func pinCPU(cpu int) error {
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return fmt.Errorf("pin to CPU %d (see -cpu): %w", cpu, err)
	}
	return nil
}

// run measures setups independent setups one after the other (each one's maps are freed
// before the next is made). Where a map's memory lands, and where each flow hashes, is fixed
// for a setup and differs between setups: two paths doing equal work can differ by ±20% in
// one setup and swap places in the next, so a ratio is judged on its median over setups.
func run(ctx context.Context, p params, setups, cpu int, png, command string) error {
	if err := pinCPU(cpu); err != nil {
		return err
	}
	noop := loader.NoopObjects{}
	if err := loader.LoadNoopObjects(&noop, nil); err != nil {
		return fmt.Errorf("load the no-op program: %w", err)
	}
	defer noop.Close()
	var perSetup [][]ratio
	for i := range setups {
		q := p
		q.seed = p.seed + uint64(i)
		rs, err := measureSetup(ctx, q, noop.TernNoop, i == 0, png, command)
		if err != nil {
			return fmt.Errorf("setup %d of %d: %w", i+1, setups, err)
		}
		perSetup = append(perSetup, rs)
	}
	if setups > 1 {
		reportAcrossSetups(os.Stdout, perSetup)
	}
	return nil
}

// measureSetup makes one setup, measures it and returns its ratios; the first setup's full
// report (and plot) is printed.
func measureSetup(ctx context.Context, p params, noop *ebpf.Program, report bool, png, command string) ([]ratio, error) {
	fmt.Fprintf(os.Stderr, "setting up the datapaths (frames, Services, opening flows; seed %d)...\n", p.seed)
	b, err := setup(ctx, p, noop)
	defer b.Close()
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(os.Stderr, "measuring %d scenarios x %d rounds...\n", len(b.scenarios), p.rounds)
	if err := b.measure(ctx); err != nil {
		return nil, err
	}
	if !report {
		return b.ratios(), nil
	}
	b.report(os.Stdout, command)
	if png != "" {
		if err := b.plot(png); err != nil {
			return nil, err
		}
	}
	return b.ratios(), nil
}
