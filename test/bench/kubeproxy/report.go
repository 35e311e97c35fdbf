package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tern-net/tern/test/bench/hostinfo"
)

const (
	pathClusterIP = "clusterip" // pod → ClusterIP → pod on another node
	pathNodePort  = "nodeport"  // external client → node:NodePort → pod on another node

	kindConn   = "conn"   // new connections per second
	kindRR     = "rr"     // kept-alive requests per second (with p50/p99)
	kindStream = "stream" // Gbit/s on one connection
)

// sample is one measurement.
type sample struct {
	Path     string  `json:"path"`
	Kind     string  `json:"kind"`
	Datapath string  `json:"datapath"`
	Services int     `json:"services"`
	Rep      int     `json:"rep"`
	Value    float64 `json:"value"` // conn/s, req/s or Gbit/s
	P50us    float64 `json:"p50us,omitempty"`
	P99us    float64 `json:"p99us,omitempty"`
	// Failed connections of a conn run (each one timed out or was refused); in a median,
	// the sum over the repetitions.
	Failed int `json:"failed,omitempty"`
	// In a median: the spread of the repetitions, smallest and largest value and p99.
	Min    float64 `json:"min,omitempty"`
	Max    float64 `json:"max,omitempty"`
	P99Min float64 `json:"p99minUs,omitempty"`
	P99Max float64 `json:"p99maxUs,omitempty"`
	// A request-rate run: requests above 1 ms, the distinct 10 ms windows they began in,
	// and the CPU time node-1's tern agent and the two kube-proxies used during the run.
	Slow           int     `json:"slow,omitempty"`
	SlowWindows    int     `json:"slowWindows,omitempty"`
	TernCPUms      float64 `json:"ternCpuMs,omitempty"`
	KubeProxyCPUms float64 `json:"kubeProxyCpuMs,omitempty"`
	// A throughput run's link counters (probe.go).
	Links map[string]linkDelta `json:"links,omitempty"`
}

// sizeStats is what the benchmark records per Service count besides the traffic.
type sizeStats struct {
	Services        int                `json:"services"`
	WritesSeconds   float64            `json:"writesSeconds"`   // creating the Services and slices this size added
	ConvergeSeconds float64            `json:"convergeSeconds"` // from the first write until every proxy served the sentinel
	RSS             map[string]float64 `json:"rssMB"`
	LoadBefore      string             `json:"loadBefore"`
	LoadAfter       string             `json:"loadAfter"`
}

// results is the benchmark's output; test/bench/plot reads its JSON (-chart kubeproxy).
type results struct {
	Command  string      `json:"command"`
	Wall     string      `json:"wall"`
	Measured string      `json:"measured"`
	Reps     int         `json:"reps"`
	Sizes    []sizeStats `json:"sizes"`
	Samples  []sample    `json:"samples"`
	Medians  []sample    `json:"medians"`           // Rep is -1
	MemRuns  []memRun    `json:"memRuns,omitempty"` // -memory-only
	params   params
}

func newResults(p params) *results {
	return &results{params: p, Reps: p.reps,
		Measured: fmt.Sprintf("%s on Linux %s, %d CPUs, %s", time.Now().UTC().Format("2006-01-02"), hostinfo.KernelRelease(), runtime.NumCPU(), runtime.Version())}
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// computeMedians reduces the samples of each (path, kind, datapath, size) to their median
// (value, p50 and p99 each on its own).
func (r *results) computeMedians() {
	type key struct {
		path, kind, dp string
		n              int
	}
	groups := map[key][]sample{}
	var order []key
	for _, s := range r.Samples {
		k := key{s.Path, s.Kind, s.Datapath, s.Services}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], s)
	}
	r.Medians = nil
	for _, k := range order {
		var v, p50, p99 []float64
		failed := 0
		for _, s := range groups[k] {
			v, p50, p99 = append(v, s.Value), append(p50, s.P50us), append(p99, s.P99us)
			failed += s.Failed
		}
		r.Medians = append(r.Medians, sample{Path: k.path, Kind: k.kind, Datapath: k.dp, Services: k.n, Rep: -1,
			Value: median(v), P50us: median(p50), P99us: median(p99), Failed: failed,
			Min: slices.Min(v), Max: slices.Max(v), P99Min: slices.Min(p99), P99Max: slices.Max(p99)})
	}
}

func (r *results) median(path, kind, dp string, n int) (sample, bool) {
	for _, m := range r.Medians {
		if m.Path == path && m.Kind == kind && m.Datapath == dp && m.Services == n {
			return m, true
		}
	}
	return sample{}, false
}

func (r *results) writeJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// plot draws the medians with test/bench/plot, a module of its own (it keeps the plotting
// library out of the agent's module graph), from a temporary JSON file.
func (r *results) plot(path string) error {
	f, err := os.CreateTemp("", "tern-kubeproxy-*.json")
	if err != nil {
		return err
	}
	f.Close()
	defer os.Remove(f.Name())
	if err := r.writeJSON(f.Name()); err != nil {
		return err
	}
	out, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	cmd := exec.Command("go", "run", ".", "-chart", "kubeproxy", "-in", f.Name(), "-out", out)
	cmd.Dir = "test/bench/plot"
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("draw %s with test/bench/plot (run from the repository root; the report above has the numbers): %w", path, err)
	}
	return nil
}

// againstRouted compares each NodePort datapath with the same hops without a Service (the
// external client's traffic routed through node-1): what the datapath itself costs, the
// detour through the node taken out.
func (r *results) againstRouted() string {
	var b strings.Builder
	for _, st := range r.Sizes {
		n := st.Services
		var parts []string
		for _, dp := range datapaths {
			if dp.key == "none" || dp.key == "routed" {
				continue
			}
			var cells []string
			for _, kind := range []string{kindConn, kindRR, kindStream} {
				m, ok1 := r.median(pathNodePort, kind, dp.key, n)
				base, ok2 := r.median(pathNodePort, kind, "routed", n)
				if ok1 && ok2 {
					cells = append(cells, fmt.Sprintf("%s %s", map[string]string{kindConn: "conn/s", kindRR: "req/s", kindStream: "Gbit/s"}[kind], ratio(m.Value, base.Value)))
				}
			}
			if len(cells) > 0 {
				parts = append(parts, dp.name+" "+strings.Join(cells, ", "))
			}
		}
		if len(parts) > 0 {
			fmt.Fprintf(&b, "%d Services, ×(no Service, through node-1): %s.\n", n, strings.Join(parts, "; "))
		}
	}
	if b.Len() > 0 {
		b.WriteString("\n")
	}
	return b.String()
}

// spread prints a median with the smallest and largest repetition, so a reader can tell a
// gap between datapaths from the run-to-run noise.
func spread(med, lo, hi float64, format string) string {
	return fmt.Sprintf(format+" ("+format+"–"+format+")", med, lo, hi)
}

func ratio(v, base float64) string {
	if base == 0 {
		return ""
	}
	return fmt.Sprintf("%.2f", v/base)
}

func (r *results) markdown() string {
	var b strings.Builder
	if r.params.memoryOnly {
		fmt.Fprintf(&b, "Measured %s. Whole run: %s. Memory only: medians of %d restarts of node-1's agent (in brackets: the smallest and largest).\n\n",
			r.Measured, r.Wall, r.Reps)
	} else {
		fmt.Fprintf(&b, "Measured %s. Whole run: %s. Medians of %d repetitions (in brackets: the smallest and largest repetition); each connection and request run lasts %s, each throughput run %s.\n\n",
			r.Measured, r.Wall, r.Reps, r.params.dur, r.params.streamDur)
	}
	fmt.Fprintf(&b, "```\n%s\n```\n\n", r.Command)
	names := map[string]string{}
	for _, dp := range datapaths {
		names[dp.key] = dp.name
	}
	titles := map[string]string{
		pathClusterIP: "ClusterIP: pod → Service → pod on another node",
		pathNodePort:  "NodePort: client outside the VPC → node:NodePort → pod on another node",
	}
	b.WriteString(r.memoryMarkdown())
	for _, path := range []string{pathClusterIP, pathNodePort} {
		if !wants(r.params.paths, path) || r.params.memoryOnly {
			continue
		}
		fmt.Fprintf(&b, "#### %s\n\n", titles[path])
		b.WriteString("| Services | datapath | new conn/s (min–max) | ×none | failed conns | kept-alive req/s (min–max) | p50 µs | p99 µs (min–max) | ×none | Gbit/s (min–max) | ×none |\n")
		b.WriteString("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, st := range r.Sizes {
			n := st.Services
			base := map[string]float64{}
			for _, kind := range []string{kindConn, kindRR, kindStream} {
				if m, ok := r.median(path, kind, "none", n); ok {
					base[kind] = m.Value
				}
			}
			for _, dp := range datapaths {
				cells := []string{strconv.Itoa(n), names[dp.key]}
				seen := false
				if c, ok := r.median(path, kindConn, dp.key, n); ok {
					seen = true
					cells = append(cells, spread(c.Value, c.Min, c.Max, "%.0f"), ratio(c.Value, base[kindConn]), strconv.Itoa(c.Failed))
				} else {
					cells = append(cells, "–", "", "")
				}
				if rr, ok := r.median(path, kindRR, dp.key, n); ok {
					seen = true
					cells = append(cells, spread(rr.Value, rr.Min, rr.Max, "%.0f"), fmt.Sprintf("%.0f", rr.P50us),
						spread(rr.P99us, rr.P99Min, rr.P99Max, "%.0f"), ratio(rr.Value, base[kindRR]))
				} else {
					cells = append(cells, "–", "", "", "")
				}
				if s, ok := r.median(path, kindStream, dp.key, n); ok {
					seen = true
					cells = append(cells, spread(s.Value, s.Min, s.Max, "%.2f"), ratio(s.Value, base[kindStream]))
				} else {
					cells = append(cells, "–", "")
				}
				if seen {
					fmt.Fprintf(&b, "| %s |\n", strings.Join(cells, " | "))
				}
			}
		}
		b.WriteString("\n")
		if path == pathNodePort {
			b.WriteString(r.againstRouted())
		}
	}
	b.WriteString("#### Memory (VmRSS after the measurements) and set-up\n\n")
	b.WriteString("| Services | tern agent | tern agent, no Services | kube-proxy iptables | kube-proxy nftables | API writes | until every proxy served | load before → after |\n")
	b.WriteString("|---:|---:|---:|---:|---:|---:|---:|---|\n")
	for _, st := range r.Sizes {
		fmt.Fprintf(&b, "| %d | %.0f MB | %.0f MB | %.0f MB | %.0f MB | %.1f s | %.1f s | %s → %s |\n", st.Services,
			st.RSS["tern agent"], st.RSS["tern agent, no Services"], st.RSS["kube-proxy iptables"], st.RSS["kube-proxy nftables"],
			st.WritesSeconds, st.ConvergeSeconds, st.LoadBefore, st.LoadAfter)
	}
	b.WriteString("\nThe tern agent's Go runtime at the same moment (its /metrics): heap in use / heap allocated (live and not yet collected) / memory obtained from the OS:")
	for _, st := range r.Sizes {
		fmt.Fprintf(&b, " %d Services %.0f / %.0f / %.0f MB;", st.Services, st.RSS["tern agent go_memstats_heap_inuse_bytes"],
			st.RSS["tern agent go_memstats_heap_alloc_bytes"], st.RSS["tern agent go_memstats_sys_bytes"])
	}
	b.WriteString("\n")
	return b.String()
}
