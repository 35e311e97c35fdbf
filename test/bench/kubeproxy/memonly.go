package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// -memory-only skips the traffic measurements: at each size, node-1's tern agent (the whole
// agent: IPAM against the ECS emulator, pod networking, policy, NodePort, Services, its
// informers and metrics) is restarted -reps times (once per -agent binary each repetition,
// the order rotated), and after its first full sync and -settle its memory is read, with
// the two kube-proxies' at the same moment. Each repetition is a fresh agent process that
// lists all Services at once, as after an upgrade or a crash; the kube-proxies are the
// same processes throughout (restarting kube-proxy iptables at 10,000 Services on the
// nf_tables backend takes minutes, see the convergence benchmark), so their figures are
// repeated reads, not repetitions.

// pprofPort is where node-1's agent serves /debug/pprof/ (on the node namespace's
// loopback) with -heap-dir.
const pprofPort = 6061

// agentVariant is a tern-agent binary node-1 runs in -memory-only (-agent label=path).
type agentVariant struct{ label, path string }

type agentVariants []agentVariant

func (v *agentVariants) String() string { return fmt.Sprint(*v) }
func (v *agentVariants) Set(s string) error {
	label, path, ok := strings.Cut(s, "=")
	if !ok || label == "" || path == "" {
		return fmt.Errorf("-agent %q: want label=path of a tern-agent binary", s)
	}
	*v = append(*v, agentVariant{label: label, path: path})
	return nil
}

// memRun is one -memory-only reading: node-1's agent freshly started, read after -settle.
type memRun struct {
	Services     int                `json:"services"`
	Rep          int                `json:"rep"`
	Agent        string             `json:"agent"`
	ReadySeconds float64            `json:"readySeconds"` // start → the agent reports ready (every component's first sync)
	MB           map[string]float64 `json:"mb"`           // memory() at the reading
	Load         string             `json:"load"`
}

// labBinDir makes the bench's own copy of binDir when -agent variants are given: node-1's
// tern-agent is replaced there before each restart, so the caller's directory is never
// written.
func labBinDir(binDir string, vs agentVariants) (string, func(), error) {
	if len(vs) == 0 {
		return binDir, func() {}, nil
	}
	dir, err := os.MkdirTemp("", "tern-kubeproxy-bench-agents-")
	if err != nil {
		return "", nil, err
	}
	for _, f := range []string{"tern-agent", "tern-cni"} {
		if err := copyExecutable(filepath.Join(binDir, f), filepath.Join(dir, f)); err != nil {
			os.RemoveAll(dir)
			return "", nil, err
		}
	}
	return dir, func() { os.RemoveAll(dir) }, nil
}

// copyExecutable writes src to dst through a temporary file and a rename, so that a running
// process started from dst keeps its (unlinked) binary.
func copyExecutable(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := dst + ".new"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}

// memoryReps restarts node-1's agent reps × variants times and reads everyone's memory
// after each start.
func (b *bench) memoryReps(ctx context.Context, size int, res *results) error {
	vs := b.p.agents
	if len(vs) == 0 {
		vs = agentVariants{{label: "this"}}
	}
	n := b.l.Node(nodeTern)
	for rep := range b.p.reps {
		for k := range vs {
			v := vs[(k+rep)%len(vs)]
			if err := n.StopAgent(); err != nil {
				return err
			}
			if v.path != "" {
				if err := copyExecutable(v.path, filepath.Join(b.binDir, "tern-agent")); err != nil {
					return fmt.Errorf("install -agent %s: %w", v.label, err)
				}
			}
			start := time.Now()
			if err := n.StartAgent(ctx); err != nil {
				return fmt.Errorf("restart node-1's agent (%s) at %d Services: %w", v.label, size, err)
			}
			ready := time.Since(start)
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(b.p.settle):
			}
			m, err := b.memory()
			if err != nil {
				return err
			}
			run := memRun{Services: size, Rep: rep, Agent: v.label, ReadySeconds: ready.Seconds(), MB: m, Load: loadavg()}
			res.MemRuns = append(res.MemRuns, run)
			b.logf("%d Services, rep %d, agent %s: ready after %s; tern agent RSS %.1f MB (peak %.1f), heap in use %.1f MB; kube-proxy iptables %.1f MB, nftables %.1f MB; load %s",
				size, rep+1, v.label, ready.Round(time.Millisecond), m["tern agent"], m["tern agent peak"],
				m["tern agent go_memstats_heap_inuse_bytes"], m["kube-proxy iptables"], m["kube-proxy nftables"], run.Load)
			if b.p.heapDir != "" {
				path := filepath.Join(b.p.heapDir, fmt.Sprintf("heap-%d-%s-%d.pb.gz", size, v.label, rep+1))
				if err := b.saveHeapProfile(path); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// saveHeapProfile fetches node-1's agent heap profile (for go tool pprof) into path.
func (b *bench) saveHeapProfile(path string) error {
	var body []byte
	var rerr error
	err := inNS(b.l.Node(nodeTern).NS, 1, func(int) {
		c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", pprofPort), 2*time.Second)
		if err != nil {
			rerr = err
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := fmt.Fprintf(c, "GET /debug/pprof/heap HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"); err != nil {
			rerr = err
			return
		}
		body, rerr = io.ReadAll(c)
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return fmt.Errorf("read node-1's agent heap profile: %w", err)
	}
	_, payload, ok := strings.Cut(string(body), "\r\n\r\n")
	if !ok || !strings.HasPrefix(string(body), "HTTP/1.0 200") && !strings.HasPrefix(string(body), "HTTP/1.1 200") {
		return fmt.Errorf("node-1's agent heap profile: unexpected answer %.200q", body)
	}
	return os.WriteFile(path, []byte(payload), 0o644)
}

// memoryMarkdown is -memory-only's table: per size and agent binary, the median over the
// repetitions with the smallest and largest in brackets.
func (r *results) memoryMarkdown() string {
	if len(r.MemRuns) == 0 {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "#### Memory at each size: node-1's whole tern agent restarted %d times per binary, read %s after it reported ready; the kube-proxies read at the same moments (MB, median (min–max))\n\n", r.Reps, r.params.settle)
	b.WriteString("| Services | tern agent | VmRSS | VmHWM (peak) | anon / file | Go heap in use | Go heap allocated | Go runtime from the OS | start → ready | kube-proxy iptables VmRSS / peak | kube-proxy nftables VmRSS / peak | tern agent RSS per rep | load |\n")
	b.WriteString("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n")
	type key struct {
		n     int
		agent string
	}
	groups := map[key][]memRun{}
	var order []key
	for _, m := range r.MemRuns {
		k := key{m.Services, m.Agent}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], m)
	}
	for _, k := range order {
		runs := groups[k]
		col := func(name, format string) string {
			var xs []float64
			for _, m := range runs {
				xs = append(xs, m.MB[name])
			}
			return spread(median(xs), slices.Min(xs), slices.Max(xs), format)
		}
		var ready []float64
		var per, loads []string
		for _, m := range runs {
			ready = append(ready, m.ReadySeconds)
			per = append(per, fmt.Sprintf("%.1f", m.MB["tern agent"]))
			loads = append(loads, strings.Fields(m.Load)[0])
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %s | %s / %s | %s | %s | %s | %.1f s | %s / %s | %s / %s | %s | %s |\n", k.n, k.agent,
			col("tern agent", "%.1f"), col("tern agent peak", "%.1f"), col("tern agent anon", "%.1f"), col("tern agent file", "%.1f"),
			col("tern agent go_memstats_heap_inuse_bytes", "%.1f"), col("tern agent go_memstats_heap_alloc_bytes", "%.1f"),
			col("tern agent go_memstats_sys_bytes", "%.1f"), median(ready),
			col("kube-proxy iptables", "%.0f"), col("kube-proxy iptables peak", "%.0f"),
			col("kube-proxy nftables", "%.0f"), col("kube-proxy nftables peak", "%.0f"),
			strings.Join(per, ", "), strings.Join(loads, ", "))
	}
	b.WriteString("\n")
	return b.String()
}

// labPprof is node-1's agent pprof address with -heap-dir, "" without.
func labPprof(heapDir string) string {
	if heapDir == "" {
		return ""
	}
	return fmt.Sprintf("127.0.0.1:%d", pprofPort)
}
