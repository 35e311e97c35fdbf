// Command policy measures what NetworkPolicy costs (make bench-policy; docs/benchmarks.md):
//
//   - per packet, with BPF_PROG_TEST_RUN on the real pod programs: an endpoint with no
//     policy, with 100 and with 10,000 rules, both directions, the first packet of a flow
//     (the whole lookup: ipcache, isolation, LPM trie, then a conntrack insert) and a packet
//     of an established flow (the verdict cached in its conntrack entry), over a working set
//     larger than the last-level cache: hundreds of thousands of flows opened through the
//     programs themselves, to tens of thousands of peer addresses, the three datapaths
//     interleaved in every round;
//   - the compiler on 1,000 policies over 2,000 pods (policytest.BigState): a whole compile,
//     the maps it fills and their kernel memory;
//   - identity churn: one pod's labels change (a new identity); the time to recompile
//     (whole and incremental) and write the difference into the maps, and how many entries
//     were written.
//
// Every measured run's verdict is checked (an allowed packet must pass), and a denied
// peer's SYN must be dropped on the endpoints with rules, so a number is never the cost of
// some other path. The kernel's own per-run duration is used (test/bench/progrun), median
// over rounds.
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

	"golang.org/x/sys/unix"
)

func main() {
	var p params
	rules := flag.String("rules", "0,100,10000", "rules on the endpoint per datapath, comma separated (0: no policy, the baseline)")
	flag.IntVar(&p.flows, "flows", 400000, "established flows per direction per datapath")
	flag.IntVar(&p.newFlows, "new", 50000, "new flows per direction per datapath per round")
	flag.IntVar(&p.peers, "peers", 60000, "peer pod addresses in the ipcache (its size is 65,536)")
	flag.IntVar(&p.rounds, "rounds", 5, "rounds; medians are over rounds")
	flag.IntVar(&p.churn, "churn", 20, "identity changes measured on the 1,000-policy cluster")
	cpu := flag.Int("cpu", 0, "CPU to run on")
	flag.Parse()
	for _, s := range strings.Split(*rules, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 0 {
			fmt.Fprintf(os.Stderr, "policy bench: -rules %q: %q is not a number >= 0\n", *rules, s)
			os.Exit(2)
		}
		p.rules = append(p.rules, n)
	}
	if p.flows < 1 || p.newFlows < 1 || p.rounds < 1 || p.peers < 1 || p.peers > 65000 || p.churn < 1 {
		fmt.Fprintln(os.Stderr, "policy bench: need -flows, -new, -rounds, -churn >= 1 and 1 <= -peers <= 65000")
		os.Exit(2)
	}
	command := "go run ./test/bench/policy " + strings.Join(os.Args[1:], " ")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, p, *cpu, command); err != nil {
		fmt.Fprintln(os.Stderr, "policy bench:", err)
		stop()
		os.Exit(1)
	}
}

func run(ctx context.Context, p params, cpu int, command string) error {
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return fmt.Errorf("pin to CPU %d (see -cpu): %w", cpu, err)
	}
	fmt.Fprintln(os.Stderr, "compiler and identity churn on 1,000 policies over 2,000 pods...")
	cr, err := measureCompiler(p.churn)
	if err != nil {
		return err
	}
	fmt.Fprintln(os.Stderr, "setting up the datapaths (rules, peers, opening flows)...")
	b, err := setup(ctx, p)
	defer b.Close()
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "measuring %d datapaths x %d rounds...\n", len(b.subjects), p.rounds)
	if err := b.measure(ctx); err != nil {
		return err
	}
	b.report(os.Stdout, command, cr)
	return nil
}
