package main

import (
	"fmt"
	"io"

	"github.com/tern-net/tern/test/bench/hostinfo"
)

func mib(b uint64) string { return fmt.Sprintf("%.0f MiB", float64(b)/(1<<20)) }

// cost is a scenario's median ns per packet, raw and over the no-op program.
func (b *bench) cost(sc *scenario) (raw, own float64) {
	raw = median(sc.ns)
	return raw, raw - median(b.noop.ns)
}

type ratio struct {
	what      string
	raw, own  float64
	target    float64
	judged    bool // counts toward the targets (v2 only)
	available bool
}

func (b *bench) ratios() []ratio {
	small, big := b.p.sizes[0], b.p.sizes[len(b.p.sizes)-1]
	var out []ratio
	r := func(what string, num, den *scenario, target float64, judged bool) {
		if num == nil || den == nil {
			out = append(out, ratio{what: what, target: target, judged: judged})
			return
		}
		nr, no := b.cost(num)
		dr, do := b.cost(den)
		out = append(out, ratio{what: what, raw: nr / dr, own: no / do, target: target, judged: judged, available: true})
	}
	for _, v := range []string{"v2", "v1"} {
		judged := v == "v2"
		r(fmt.Sprintf("%s scale, from pod established: cost(%d Services) / cost(%d)", v, big, small),
			b.find(v, big, false, kindFwdEst), b.find(v, small, false, kindFwdEst), 1.3, judged)
		r(fmt.Sprintf("%s scale, to pod reply: cost(%d Services) / cost(%d)", v, big, small),
			b.find(v, big, false, kindRepEst), b.find(v, small, false, kindRepEst), 1.3, judged)
		for _, n := range b.p.sizes {
			r(fmt.Sprintf("%s reply / forward, %d Services, 1 frontend per backend", v, n),
				b.find(v, n, false, kindRepEst), b.find(v, n, false, kindFwdEst), 1.0, judged)
		}
		fo := b.p.fanout
		if v == "v1" {
			fo = b.p.v1Fanout
		}
		for _, n := range b.p.sizes {
			if n >= b.p.fanout {
				r(fmt.Sprintf("%s reply / forward, %d Services, %d frontends per backend", v, n, fo),
					b.find(v, n, true, kindRepEst), b.find(v, n, true, kindFwdEst), 1.0, judged)
			}
		}
	}
	return out
}

func (b *bench) report(w io.Writer, command string) {
	llc, llcDesc := hostinfo.LLC()
	fmt.Fprintf(w, "Command: `%s`\n\n", command)
	fmt.Fprintf(w, "Kernel %s, %s, last-level cache %s (sysfs, CPU 0). %d rounds, %s of measuring; each round runs every frame of every scenario once, scenario order rotated per round.\n\n",
		hostinfo.KernelRelease(), hostinfo.CPUModel(), llcDesc, b.p.rounds, b.elapsed.Round(1e9))
	noop := median(b.noop.ns)
	fmt.Fprintf(w, "Median over rounds of the mean kernel-reported ns per BPF_PROG_TEST_RUN (one frame per call, Repeat=1); "+
		"\"own\" subtracts the no-op tc program measured the same way in the same run (%.1f ns: test-run machinery and clock reads).\n\n", noop)
	fmt.Fprintf(w, "| path | Services | frontends per backend (v1 / v2) | frames per round | v1 ns | v1 own | v2 ns | v2 own | v2 own / v1 own |\n")
	fmt.Fprintf(w, "|---|---:|---|---:|---:|---:|---:|---:|---:|\n")
	for _, k := range []kind{kindFwdEst, kindRepEst, kindNew, kindNSFwd, kindNSRep} {
		for _, shared := range []bool{false, true} {
			for _, n := range b.p.sizes {
				v1, v2 := b.find("v1", n, shared, k), b.find("v2", n, shared, k)
				if v1 == nil || v2 == nil {
					continue
				}
				fo := "1 / 1"
				if shared {
					fo = fmt.Sprintf("%d / %d", v1.s.topo.fanout, v2.s.topo.fanout)
				}
				r1, o1 := b.cost(v1)
				r2, o2 := b.cost(v2)
				fmt.Fprintf(w, "| %s | %d | %s | %d | %.1f | %.1f | %.1f | %.1f | %.2f |\n",
					k, n, fo, v2.frames(0).n, r1, o1, r2, o2, o2/o1)
			}
		}
	}
	fmt.Fprintf(w, "\n| ratio | raw | own (over no-op) | target | |\n|---|---:|---:|---:|---|\n")
	for _, r := range b.ratios() {
		verdict := "reference (v1)"
		if r.judged {
			switch {
			case !r.available:
				verdict = "not measured"
			case r.own <= r.target:
				verdict = "met"
			default:
				verdict = fmt.Sprintf("**missed by %.0f%%**", (r.own/r.target-1)*100)
			}
		}
		if !r.available {
			fmt.Fprintf(w, "| %s | – | – | ≤ %.1f | %s |\n", r.what, r.target, verdict)
			continue
		}
		fmt.Fprintf(w, "| %s | %.3f | %.3f | ≤ %.1f | %s |\n", r.what, r.raw, r.own, r.target, verdict)
	}
	fmt.Fprintf(w, "\n| datapath | Services loaded in | kernel memory of its maps | conntrack entries sized for |\n|---|---:|---:|---:|\n")
	for _, s := range b.subjects {
		fmt.Fprintf(w, "| %s | %s | %s | %d |\n", s, s.seed.Round(1e6), mib(s.mapBytes()), ctEntries(b.p, s.version))
	}
	var total uint64
	for _, s := range b.subjects {
		total += s.mapBytes()
	}
	fmt.Fprintf(w, "\nWorking set: %d established service flows and %d non-service flows per datapath over random VIPs, %d new flows per datapath per round; "+
		"each frame runs once per round, so between two packets of one flow the run touches every other flow of every datapath: %s of map memory in all, against a %s last-level cache (%.1f×). "+
		"Every run's verdict and output frame were checked (%d runs).\n",
		b.p.flows, b.p.nonSvc, b.p.newFlows, mib(total), mib(llc), float64(total)/float64(max(llc, 1)), b.checkedRuns())
}

func (b *bench) checkedRuns() int {
	n := 0
	for _, sc := range b.scenarios {
		n += sc.runs
	}
	return n
}

// reportAcrossSetups prints every ratio per setup and its median over setups, which is what
// the targets are judged on when there is more than one setup.
func reportAcrossSetups(w io.Writer, perSetup [][]ratio) {
	fmt.Fprintf(w, "\nThe same ratios (own, over no-op) in each of %d independent setups, and their median:\n\n| ratio |", len(perSetup))
	for i := range perSetup {
		fmt.Fprintf(w, " setup %d |", i+1)
	}
	fmt.Fprintf(w, " median | target | |\n|---|")
	for range perSetup {
		fmt.Fprintf(w, "---:|")
	}
	fmt.Fprintf(w, "---:|---:|---|\n")
	for j, r := range perSetup[0] {
		if !r.available {
			continue
		}
		vals := make([]float64, 0, len(perSetup))
		fmt.Fprintf(w, "| %s |", r.what)
		for _, rs := range perSetup {
			fmt.Fprintf(w, " %.3f |", rs[j].own)
			vals = append(vals, rs[j].own)
		}
		m := median(vals)
		verdict := "reference (v1)"
		if r.judged {
			verdict = "met"
			if m > r.target {
				verdict = fmt.Sprintf("**missed by %.0f%%**", (m/r.target-1)*100)
			}
		}
		fmt.Fprintf(w, " %.3f | ≤ %.1f | %s |\n", m, r.target, verdict)
	}
}
