// Command kubeproxy compares Service datapaths in one lab, in one run: tern, the real
// kube-proxy in iptables mode and in nftables mode, and no Service at all (the client
// dialling the backends' pod IPs itself), at several Service counts. For a ClusterIP from a
// pod, and for a NodePort from a client outside the VPC, it measures new connections per
// second (connect, request, close), a kept-alive request rate with p50/p99 latency, and
// bulk throughput; and the resident memory of tern's whole agent and of kube-proxy. It
// prints a Markdown report (medians of the repetitions, ratios against no Service) and
// draws a PNG with test/bench/plot.
//
// Every datapath runs at the same time in the same lab (test/lab, four nodes: see
// setup.go), so they share the apiserver, the Services and the five backend pods, and the
// measurements interleave: one short run of each datapath in turn, repeated, so that the
// load of a shared machine falls on all of them alike.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"github.com/tern-net/tern/test/bench/procmem"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"

	"github.com/tern-net/tern/test/lab"
)

type params struct {
	sizes           []int
	reps            int
	dur             time.Duration // each connection-rate and request-rate run
	streamDur       time.Duration // each throughput run
	connWorkers     int
	rrConns         int
	workers         int // parallel API clients creating Services
	convergeTimeout time.Duration
	paths, kinds    []string // what to measure (default: everything)
	perfDir         string   // when set, a system-wide perf profile of every throughput run goes here
	fill            string   // fillEtcd or fillAPI: how the filler Services are written
	memoryOnly      bool     // no traffic: restart node-1's agent and read memory (memonly.go)
	agents          agentVariants
	settle          time.Duration // -memory-only: from the agent's ready to the reading
	heapDir         string        // -memory-only: node-1's agent heap profiles go here
}

// wants reports whether the run measures path (or kind): all of them unless narrowed.
func wants(list []string, v string) bool { return len(list) == 0 || slices.Contains(list, v) }

// parseList splits a comma-separated flag and checks every item against valid.
func parseList(flagName, s string, valid []string) ([]string, error) {
	var out []string
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if !slices.Contains(valid, f) {
			return nil, fmt.Errorf("-%s %q: %q is not one of %s", flagName, s, f, strings.Join(valid, ", "))
		}
		out = append(out, f)
	}
	return out, nil
}

func main() {
	var (
		sizes    = flag.String("services", "1,1000,10000", "Service counts to measure, ascending (each size adds Services to the last)")
		reps     = flag.Int("reps", 5, "repetitions of every measurement; the report gives medians with the smallest and largest")
		dur      = flag.Duration("duration", 2*time.Second, "length of each connection-rate and request-rate run")
		sdur     = flag.Duration("stream-duration", 2*time.Second, "length of each throughput run")
		cw       = flag.Int("conn-workers", 4, "concurrent clients opening connections")
		rrc      = flag.Int("rr-conns", 4, "kept-alive connections for the request rate")
		workers  = flag.Int("workers", 32, "parallel API clients creating Services")
		converge = flag.Duration("converge-timeout", 10*time.Minute, "how long every proxy may take to serve a new size")
		png      = flag.String("png", "", "draw the medians into this PNG with test/bench/plot (run from the repository root)")
		jsonOut  = flag.String("json", "", "write every sample and median to this JSON file")
		binDir   = flag.String("bindir", "", "prebuilt tern-agent and tern-cni (default: built into a temporary directory)")
		paths    = flag.String("paths", pathClusterIP+","+pathNodePort, "paths to measure: clusterip, nodeport")
		kinds    = flag.String("kinds", kindConn+","+kindRR+","+kindStream, "measurements: conn (new connections), rr (kept-alive requests), stream (throughput)")
		perfDir  = flag.String("perf", "", "record a system-wide `perf record -g` profile of every throughput run into this directory (needs perf)")
		fill     = flag.String("fill", fillAPI, "how filler Services and slices are written: api (through the apiserver, as a controller would) or etcd (straight into etcd: seconds instead of minutes at 10,000)")
		memOnly  = flag.Bool("memory-only", false, "no traffic: at each size restart node-1's tern agent -reps times (per -agent binary) and read its and the kube-proxies' memory")
		settle   = flag.Duration("settle", 15*time.Second, "-memory-only: wait this long after the restarted agent is ready before reading memory")
		heapDir  = flag.String("heap-dir", "", "-memory-only: save node-1's agent heap profile (its pprofAddr) after each reading into this directory")
		agents   agentVariants
	)
	flag.Var(&agents, "agent", "-memory-only: label=path of a tern-agent binary node-1 runs (repeatable, order rotated per repetition; default: the lab's)")
	flag.Parse()
	p := params{reps: *reps, dur: *dur, streamDur: *sdur, connWorkers: *cw, rrConns: *rrc, workers: *workers, convergeTimeout: *converge, perfDir: *perfDir,
		fill: *fill, memoryOnly: *memOnly, agents: agents, settle: *settle, heapDir: *heapDir}
	var err error
	if p.sizes, err = parseSizes(*sizes); err == nil && (p.reps < 1 || p.connWorkers < 1 || p.rrConns < 1 || p.workers < 1) {
		err = errors.New("-reps, -conn-workers, -rr-conns and -workers must be positive")
	}
	if err == nil && p.fill != fillAPI && p.fill != fillEtcd {
		err = fmt.Errorf("-fill %q: want api or etcd", p.fill)
	}
	if err == nil && !p.memoryOnly && (len(p.agents) > 0 || p.heapDir != "") {
		err = errors.New("-agent and -heap-dir go with -memory-only")
	}
	if err == nil {
		p.paths, err = parseList("paths", *paths, []string{pathClusterIP, pathNodePort})
	}
	if err == nil {
		p.kinds, err = parseList("kinds", *kinds, []string{kindConn, kindRR, kindStream})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubeproxy:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	began := time.Now()
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "[%6.1fs] %s\n", time.Since(began).Seconds(), fmt.Sprintf(format, args...))
	}
	res, err := run(ctx, p, *binDir, logf)
	if res != nil {
		res.Command = "go run ./test/bench/kubeproxy " + strings.Join(os.Args[1:], " ")
		res.Wall = time.Since(began).Round(time.Second).String()
		fmt.Print(res.markdown())
		if *jsonOut != "" {
			if werr := res.writeJSON(*jsonOut); werr != nil {
				err = errors.Join(err, werr)
			}
		}
		if *png != "" && len(res.Medians) > 0 {
			if perr := res.plot(*png); perr != nil {
				err = errors.Join(err, perr)
			}
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubeproxy:", err)
		stop()
		os.Exit(1)
	}
}

func parseSizes(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 50000 {
			return nil, fmt.Errorf("-services %q: want ascending counts between 1 and 50000, e.g. 1,1000,10000", s)
		}
		out = append(out, n)
	}
	if !slices.IsSorted(out) {
		return nil, fmt.Errorf("-services %q: sizes must ascend", s)
	}
	return out, nil
}

func run(ctx context.Context, p params, binDir string, logf func(string, ...any)) (*results, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("needs root (network namespaces, BPF, kube-proxy's rules): run with sudo")
	}
	if binDir == "" {
		dir, err := os.MkdirTemp("", "tern-kubeproxy-bench-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(dir)
		logf("building tern-agent and tern-cni")
		if err := lab.BuildBinaries(ctx, dir); err != nil {
			return nil, err
		}
		binDir = dir
	}
	binDir, cleanup, err := labBinDir(binDir, p.agents)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	if p.heapDir != "" {
		if err := os.MkdirAll(p.heapDir, 0o755); err != nil {
			return nil, err
		}
	}
	logf("bringing the lab up (4 nodes, apiserver, two kube-proxies)")
	setupCtx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	b, err := setup(setupCtx, p, binDir, logf)
	cancel()
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := b.Close(); cerr != nil {
			logf("lab down: %v", cerr)
		}
	}()
	res := newResults(p)
	for _, size := range p.sizes {
		logf("growing to %d Services", size)
		writes, conv, err := b.grow(ctx, size)
		if err != nil {
			return res, err
		}
		st := sizeStats{Services: size, WritesSeconds: writes.Seconds(), ConvergeSeconds: conv.Seconds(), LoadBefore: loadavg()}
		logf("%d Services: API writes %s, every proxy serving %s; load %s", size, writes.Round(time.Millisecond), conv.Round(time.Millisecond), st.LoadBefore)
		if m, err := b.memory(); err == nil {
			logf("%d Services, memory before the measurements (MB): %v", size, m)
		}
		if p.memoryOnly {
			if err := b.memoryReps(ctx, size, res); err != nil {
				return res, err
			}
		}
		for rep := range p.reps {
			if p.memoryOnly {
				break
			}
			if err := b.measure(ctx, size, rep, res); err != nil {
				return res, err
			}
		}
		st.LoadAfter = loadavg()
		if st.RSS, err = b.memory(); err != nil {
			return res, err
		}
		res.Sizes = append(res.Sizes, st)
		logf("%d Services done; RSS %v; load %s", size, st.RSS, st.LoadAfter)
		// The report so far, so that an interrupted run keeps what it measured.
		res.computeMedians()
		logf("report so far:\n%s", res.markdown())
	}
	res.computeMedians()
	return res, nil
}

// memory reads the resident memory of node-1's whole tern agent, node-4's (IPAM and pod
// networking only, for comparison) and the two kube-proxies, in MB.
func (b *bench) memory() (map[string]float64, error) {
	pids := map[string]int{
		"tern agent":              b.l.Node(nodeTern).AgentPID(),
		"tern agent, no Services": b.l.Node(nodeServers).AgentPID(),
		"kube-proxy iptables":     b.kps["iptables"].PID(),
		"kube-proxy nftables":     b.kps["nftables"].PID(),
	}
	out := map[string]float64{}
	for name, pid := range pids {
		r, peak, err := procmem.Read(pid)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out[name], out[name+" peak"] = float64(r)/1e6, float64(peak)/1e6
	}
	// What backs node-1's agent's resident set: anonymous (Go heap, stacks, runtime) or
	// file pages (its binary).
	k, err := procmem.ReadKinds(pids["tern agent"])
	if err != nil {
		return nil, fmt.Errorf("tern agent: %w", err)
	}
	out["tern agent anon"], out["tern agent file"] = float64(k.Anon)/1e6, float64(k.File)/1e6
	// What the Go runtime says of the tern agent's memory, from its /metrics: how much of
	// the RSS is live heap, and how much the runtime holds beyond it.
	text, err := b.agentMetrics()
	if err != nil {
		return nil, err
	}
	for _, m := range []string{"go_memstats_heap_inuse_bytes", "go_memstats_heap_alloc_bytes", "go_memstats_sys_bytes"} {
		for _, line := range strings.Split(text, "\n") {
			if f := strings.Fields(line); len(f) == 2 && f[0] == m {
				v, err := strconv.ParseFloat(f[1], 64)
				if err != nil {
					return nil, fmt.Errorf("tern agent metric %s: %w", line, err)
				}
				out["tern agent "+m] = v / 1e6
			}
		}
	}
	return out, nil
}

// agentMetrics reads node-1's agent /metrics inside the node's namespace (it listens on
// the node's loopback), dialled from a thread in that namespace.
func (b *bench) agentMetrics() (string, error) {
	var body []byte
	var rerr error
	err := inNS(b.l.Node(nodeTern).NS, 1, func(int) {
		c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", lab.MetricsPort), 2*time.Second)
		if err != nil {
			rerr = err
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := fmt.Fprintf(c, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"); err != nil {
			rerr = err
			return
		}
		body, rerr = io.ReadAll(c)
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return "", fmt.Errorf("read the tern agent's /metrics: %w", err)
	}
	return string(body), nil
}

// proxyCPU is the CPU time (user + system, ms) node-1's tern agent and the two kube-proxies
// have used so far: a proxy busy during a latency run shows here.
func (b *bench) proxyCPU() (tern, kubeProxies float64) {
	tern = cpuMillis(b.l.Node(nodeTern).AgentPID())
	for _, kp := range b.kps {
		kubeProxies += cpuMillis(kp.PID())
	}
	return tern, kubeProxies
}

// cpuMillis reads a process's user + system time from /proc/PID/stat; 0 when the process is
// gone (the difference of two reads is then meaningless, and the log says so by its size).
func cpuMillis(pid int) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The fields after the command name (which may hold spaces): utime and stime are the
	// 12th and 13th of them.
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0
	}
	return float64(u+st) * 10 // clock ticks of 1/100 s (USER_HZ)
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// target is where a client of one datapath connects, for one path and service port.
func (b *bench) target(path string, dp datapath, svcPort, nodePort, podPort int) (netns.NsHandle, []string) {
	var ns netns.NsHandle
	switch {
	case path == pathClusterIP && dp.key == "none":
		ns = b.direct.NS()
	case path == pathClusterIP:
		ns = b.clients[dp.node].NS()
	case dp.key == "routed":
		ns = b.routed.NS
	default:
		ns = b.ext.NS()
	}
	if dp.key == "none" || dp.key == "routed" {
		var addrs []string
		for _, s := range b.servers {
			addrs = append(addrs, net.JoinHostPort(s.IP.String(), strconv.Itoa(podPort)))
		}
		return ns, addrs
	}
	if path == pathClusterIP {
		return ns, []string{netip.AddrPortFrom(b.vip, uint16(svcPort)).String()}
	}
	return ns, []string{net.JoinHostPort(b.l.Node(dp.node).PrimaryIP, strconv.Itoa(nodePort))}
}

// measure runs every measurement once: for each path and kind, each datapath in turn, the
// order rotated by rep so that no datapath always runs first (or last) after a switch.
func (b *bench) measure(ctx context.Context, size, rep int, res *results) error {
	order := make([]datapath, len(datapaths))
	for i := range datapaths {
		order[i] = datapaths[(i+rep)%len(datapaths)]
	}
	for _, path := range []string{pathClusterIP, pathNodePort} {
		if !wants(b.p.paths, path) {
			continue
		}
		for _, kind := range []string{kindConn, kindRR, kindStream} {
			if !wants(b.p.kinds, kind) {
				continue
			}
			for _, dp := range order {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if dp.nodePortOnly && path != pathNodePort {
					continue
				}
				s := sample{Path: path, Kind: kind, Datapath: dp.key, Services: size, Rep: rep}
				var err error
				switch kind {
				case kindConn:
					ns, t := b.target(path, dp, svcEcho, npEcho, echoPort)
					s.Value, s.Failed, err = connRate(ns, t, b.p.connWorkers, b.p.dur)
				case kindRR:
					ns, t := b.target(path, dp, svcEcho, npEcho, echoPort)
					var r rrResult
					tern0, kp0 := b.proxyCPU()
					r, err = keepAlive(ns, t, b.p.rrConns, b.p.dur)
					s.Value, s.P50us, s.P99us = r.rate, float64(r.p50.Nanoseconds())/1e3, float64(r.p99.Nanoseconds())/1e3
					s.SlowWindows, s.Slow = r.slowWindows, r.slow
					tern1, kp1 := b.proxyCPU()
					s.TernCPUms, s.KubeProxyCPUms = tern1-tern0, kp1-kp0
					b.logf("  requests above 1 ms: %d, in %d distinct 10 ms windows; CPU during the run: node-1's tern agent %.0f ms, the kube-proxies %.0f ms",
						r.slow, r.slowWindows, s.TernCPUms, s.KubeProxyCPUms)
				case kindStream:
					ns, t := b.target(path, dp, svcSink, npSink, sinkPort)
					var probe *streamProbe
					if probe, err = b.startProbe(fmt.Sprintf("%d-%s-%s-%d", size, path, dp.key, rep)); err != nil {
						return err
					}
					// One stream, to one backend: the no-Service client takes the rep's.
					s.Value, err = stream(ns, t[rep%len(t)], b.p.streamDur)
					if perr := probe.stop(); err == nil && perr != nil {
						err = perr
					}
					s.Links = probe.links
				}
				if err != nil {
					return fmt.Errorf("%s %s via %s at %d Services: %w", path, kind, dp.name, size, err)
				}
				res.Samples = append(res.Samples, s)
				b.logf("%d Services, rep %d: %s %s %s = %.4g (failed connections: %d)", size, rep+1, path, kind, dp.key, s.Value, s.Failed)
			}
		}
	}
	return nil
}
