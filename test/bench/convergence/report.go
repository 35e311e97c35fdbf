package main

import (
	"fmt"
	"runtime"
	"strings"
	"time"

	"github.com/tern-net/tern/test/k8s/controlplane"

	"github.com/tern-net/tern/test/bench/hostinfo"
)

func fmtDur(d time.Duration) string {
	switch {
	case d <= 0:
		return "—"
	case d < 10*time.Millisecond:
		return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
	case d < time.Second:
		return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond))
	default:
		return fmt.Sprintf("%.2f s", d.Seconds())
	}
}

func fmtMB(b uint64) string {
	if b == 0 {
		return "—"
	}
	return fmt.Sprintf("%.0f MB", float64(b)/1e6)
}

// fmtRatio prints tern's figure over the other agent's, and the inverse for reading ease.
func fmtRatio(tern, other time.Duration) string {
	if tern <= 0 || other <= 0 {
		return "—"
	}
	r := float64(tern) / float64(other)
	return fmt.Sprintf("%.3g (%.0f× faster)", r, 1/r)
}

func modeName(m string) string { return "kube-proxy " + m }

func renderReport(e *env, cmdline string, results []*sizeResult, total time.Duration) string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	cfg := e.cfg
	p("# Service convergence: tern vs kube-proxy\n\n")
	p("Measured %s on %s, %d CPUs, %s; Kubernetes %s (etcd, kube-apiserver and kube-proxy built from the Go module proxy by `test/k8s/build.sh`). Whole run: %s.\n\n",
		time.Now().UTC().Format("2006-01-02"), "Linux "+hostinfo.KernelRelease(), runtime.NumCPU(), runtime.Version(), controlplane.KubernetesVersion, total.Round(time.Second))
	p("```\ngo run ./test/bench/convergence %s\n```\n\n", cmdline)

	p("## EndpointSlice write → the kernel holds the new endpoint\n\n")
	p("%d changes per agent and size, Poisson arrivals at %.3g/s on average: each moves one of a random Service's %d endpoints to a new address. "+
		"Ratio is tern / kube-proxy (smaller is better for tern).\n\n", cfg.changes, cfg.rate, endpointsEach)
	p("| Services | agent | seen | p50 | p90 | p99 | max | p50 ratio | p99 ratio |\n|---:|---|---:|---:|---:|---:|---:|---|---|\n")
	for _, r := range results {
		if r.tern != nil {
			l := r.tern.lat
			p("| %d | tern (BPF maps) | %d/%d | %s | %s | %s | %s | | |\n", r.size, l.seen, l.n, fmtDur(l.p50), fmtDur(l.p90), fmtDur(l.p99), fmtDur(l.max))
		} else {
			p("| %d | tern (BPF maps) | failed: %v | | | | | | |\n", r.size, oneLine(r.tErr))
		}
		for _, kp := range r.kp {
			l := kp.lat
			var r50, r99 string
			if r.tern != nil {
				r50, r99 = fmtRatio(r.tern.lat.p50, l.p50), fmtRatio(r.tern.lat.p99, l.p99)
			}
			p("| %d | %s | %d/%d | %s | %s | %s | %s | %s | %s |\n", r.size, modeName(kp.mode), l.seen, l.n,
				fmtDur(l.p50), fmtDur(l.p90), fmtDur(l.p99), fmtDur(l.max), r50, r99)
		}
		for _, m := range cfg.modes {
			if err := r.kpErr[m]; err != nil {
				p("| %d | %s | failed: %s | | | | | | |\n", r.size, modeName(m), oneLine(err))
			}
		}
	}

	p("\nThe write itself (the EndpointSlice Update's round trip to the apiserver, which every agent's figure includes) took:")
	for _, r := range results {
		if r.tern != nil {
			p(" p50 %s / p99 %s during tern's changes at %d Services;", fmtDur(r.tern.lat.writeP50), fmtDur(r.tern.lat.writeP99), r.size)
		}
		for _, kp := range r.kp {
			p(" %s / %s during %s's;", fmtDur(kp.lat.writeP50), fmtDur(kp.lat.writeP99), kp.mode)
		}
	}
	p("\n")
	p("\n## Start, full sync, memory\n\n")
	p("| Services | agent | start → all programmed | initial sync itself | full resync | RSS after the changes | peak RSS |\n|---:|---|---:|---:|---:|---:|---:|\n")
	for _, r := range results {
		if t := r.tern; t != nil {
			p("| %d | tern | %s | %s | %s | %s | %s |\n", r.size, fmtDur(t.coldStart), fmtDur(t.coldSync), fmtDur(t.warmSync), fmtMB(t.rss), fmtMB(t.peak))
		}
		for _, kp := range r.kp {
			p("| %d | %s | %s | %s | %s | %s | %s |\n", r.size, modeName(kp.mode), fmtDur(kp.coldStart), fmtDur(kp.coldSync),
				"n/a", fmtMB(kp.rss), fmtMB(kp.peak))
		}
	}
	p("\n- tern's *start → all programmed* runs from process start (datapath load, informer LIST, batch load of empty maps) to the end of the first full sync; " +
		"*initial sync itself* is that sync's own `took`. *Full resync* is the `took` of the full sync after a restart over maps that already hold everything: " +
		"re-read the three maps and compare every frontend, the periodic resync's work (it wrote nothing).\n")
	p("- kube-proxy's *start → all programmed* runs to the end of the first sync after which its rules hold the last Service's endpoints (checked with a dump); " +
		"*initial sync itself* is that sync's `SyncProxyRules complete` elapsed time. kube-proxy has no equivalent of a resync over existing rules to compare.\n")
	p("- Memory is VmRSS and VmHWM of the agent process from /proc, after the changes. tern's BPF maps are kernel memory and not in either figure.\n")

	p("\n## kube-proxy syncs during the changes, and cross-checks\n\n")
	p("| Services | mode | ruleset (kube-proxy's count) | syncs | sync p50 | sync max | own p50 / p99 (from the annotation) | final rules: changed endpoints missing | final dump took |\n|---:|---|---|---:|---:|---:|---|---:|---:|\n")
	for _, r := range results {
		for _, kp := range r.kp {
			p("| %d | %s | %s | %d | %s | %s | %s / %s (%d lines) | %d of %d | %s |\n", r.size, kp.mode, kp.ruleset, kp.syncs, fmtDur(kp.syncP50), fmtDur(kp.syncMax),
				fmtDur(kp.lat.agentP50), fmtDur(kp.lat.agentP99), kp.lat.agentN, kp.missing, kp.checked, fmtDur(kp.dumpTook))
		}
	}
	p("\nSetup (creating Services without selectors and one EndpointSlice each, %d parallel clients):", cfg.workers)
	prev := 0
	for _, r := range results {
		p(" %d→%d in %s (%.0f objects/s);", prev, r.size, r.setup.Round(time.Millisecond), float64(2*(r.size-prev))/r.setup.Seconds())
		prev = r.size
	}
	p("\n\n## Method\n\n")
	p("- One etcd + kube-apiserver on loopback (`test/k8s/controlplane`), no controller-manager: the benchmark writes the EndpointSlices itself "+
		"(`kubernetes.io/service-name` label, `endpointslice.kubernetes.io/managed-by: %s`). Each Service has one TCP port and %d ready endpoints. "+
		"Sizes grow in one apiserver: the larger size adds Services to the smaller one's.\n", managedBy, endpointsEach)
	p("- Agents run one at a time, each against the full set: tern, then kube-proxy in each mode. The clock starts just before the EndpointSlice Update " +
		"and is also written into the slice's `endpoints.kubernetes.io/last-change-trigger-time` annotation.\n")
	p("- tern: `ternsvc` (this directory) loads the datapath with a private pin root and runs `service/controller`; the benchmark opens the pinned maps and " +
		"polls every 1 ms (frontend lookup, then its slots) until a slot holds the new address.\n")
	p("- kube-proxy runs in a network namespace of its own with default sync settings (min sync period 1 s), `-v=4`, reaching the apiserver through `nsbridge`. " +
		"After each sync's rules are committed it logs one `Network programming` line per changed Service; the line's arrival is the change's time. " +
		"Its own figure from the annotation (cross-check column) agrees with ours when the log is prompt. A final dump (`iptables-save -t nat` / `nft list table ip kube-proxy`) " +
		"checks that every changed endpoint still current is a DNAT target. Each mode gets a fresh namespace; `kube-proxy --cleanup` runs after each.\n")
	p("- Changes arrive independently of the agent (open loop), so kube-proxy's min sync period batches them as it would in a cluster: its latency includes waiting for the next allowed sync. " +
		"tern has no such batching.\n")
	p("- The machine is shared with other builds; figures carry that noise. One run, not a median of runs.\n")
	return b.String()
}

func oneLine(err error) string {
	s := strings.ReplaceAll(err.Error(), "\n", " ")
	s = strings.ReplaceAll(s, "|", "/")
	if len(s) > 200 {
		s = s[:200] + "…"
	}
	return s
}
