// Command convergence measures how fast Service changes reach the datapath, for tern and
// for the real kube-proxy (iptables and nftables modes), against one real kube-apiserver
// in one run, and prints a Markdown report (merged into docs/benchmarks.md).
//
// The figure is the time from an EndpointSlice write (one endpoint of a random Service
// moves to a new address) to the kernel holding the new endpoint: for tern, the pinned
// BPF maps polled every millisecond; for kube-proxy, its -v=4 "Network programming" log
// line, which it writes right after the rules were committed. Both are timed from the
// same instant, stamped into the slice's endpoints.kubernetes.io/last-change-trigger-time
// annotation just before the write, which kube-proxy also measures its own figure from.
//
// tern's service half runs as its own process (ternsvc) so its memory is measured alone;
// kube-proxy runs in a network namespace the benchmark creates, reaching the apiserver
// through nsbridge, so its rules never touch the host's.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/tern-net/tern/test/k8s/controlplane"
)

type config struct {
	sizes   []int
	changes int
	rate    float64
	modes   []string
	workers int
	drain   time.Duration
	// kpStartTimeout bounds kube-proxy's first sync; past it the mode is reported as failed.
	kpStartTimeout time.Duration
	logDir         string
	ternsvc        string
	seed           uint64
}

// env is what every phase shares.
type env struct {
	cfg       config
	cp        *controlplane.ControlPlane
	client    kubernetes.Interface
	cl        *cluster
	root      *nsThread // spawns ternsvc from the root namespace
	ternsvc   string
	kubeProxy string
	logDir    string
	began     time.Time
}

func (e *env) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%6.1fs] %s\n", time.Since(e.began).Seconds(), fmt.Sprintf(format, args...))
}

func main() {
	var (
		sizes   = flag.String("services", "1000,10000", "Service counts to measure, ascending; the Services of one size are kept for the next")
		modes   = flag.String("modes", "iptables,nftables", "kube-proxy modes: iptables, nftables, iptables-legacy; empty for tern only")
		changes = flag.Int("changes", 200, "EndpointSlice changes per agent and size")
		rate    = flag.Float64("rate", 5, "mean changes per second (Poisson arrivals)")
		workers = flag.Int("workers", 32, "parallel API clients creating the Services")
		drain   = flag.Duration("drain", time.Minute, "how long to wait after the last change for the agent to catch up")
		kpStart = flag.Duration("kp-start-timeout", 2*time.Minute, "how long kube-proxy may take for its first sync before the mode counts as failed")
		logDir  = flag.String("logdir", "", "keep agent and control-plane logs here (default: a temporary directory, removed)")
		ternsvc = flag.String("ternsvc", "", "prebuilt ternsvc binary (default: go build ./test/bench/convergence/ternsvc, from the repository root)")
		seed    = flag.Uint64("seed", 1, "random seed for which Services and endpoints change")
	)
	flag.Parse()
	cfg := config{changes: *changes, rate: *rate, workers: *workers, drain: *drain, kpStartTimeout: *kpStart, logDir: *logDir, ternsvc: *ternsvc, seed: *seed}
	var err error
	if cfg.sizes, err = parseSizes(*sizes); err == nil {
		cfg.modes, err = parseModes(*modes)
	}
	if err == nil && (cfg.changes < 1 || cfg.rate <= 0 || cfg.workers < 1) {
		err = errors.New("-changes, -rate and -workers must be positive")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "convergence:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	report, err := run(ctx, cfg, strings.Join(os.Args[1:], " "))
	fmt.Print(report)
	if err != nil {
		fmt.Fprintln(os.Stderr, "convergence:", err)
		stop()
		os.Exit(1)
	}
}

func parseSizes(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 50000 {
			return nil, fmt.Errorf("-services %q: want ascending counts between 1 and 50000, e.g. 1000,10000", s)
		}
		out = append(out, n)
	}
	if !slices.IsSorted(out) {
		return nil, fmt.Errorf("-services %q: sizes must ascend (each size adds Services to the last)", s)
	}
	return out, nil
}

func parseModes(s string) ([]string, error) {
	var out []string
	for _, f := range strings.Split(s, ",") {
		switch f = strings.TrimSpace(f); f {
		case "":
		case "iptables", "nftables", "iptables-legacy":
			out = append(out, f)
		default:
			return nil, fmt.Errorf("-modes: unknown kube-proxy mode %q (want iptables, nftables or iptables-legacy)", f)
		}
	}
	return out, nil
}

// sizeResult is everything measured at one Service count.
type sizeResult struct {
	size  int
	setup time.Duration // creating the Services and slices this size added
	tern  *ternResult
	tErr  error
	kp    []*kpResult
	kpErr map[string]error
}

func run(ctx context.Context, cfg config, cmdline string) (string, error) {
	if os.Geteuid() != 0 {
		return "", errors.New("needs root (BPF maps, network namespaces, kube-proxy): run with sudo")
	}
	binDir, err := controlplane.BinDir()
	if err != nil {
		return "", err
	}
	e := &env{cfg: cfg, kubeProxy: filepath.Join(binDir, "kube-proxy"), began: time.Now()}
	if e.logDir = cfg.logDir; e.logDir == "" {
		if e.logDir, err = os.MkdirTemp("", "tern-convergence-"); err != nil {
			return "", fmt.Errorf("create log directory: %w", err)
		}
		defer os.RemoveAll(e.logDir)
	} else if err := os.MkdirAll(e.logDir, 0o755); err != nil {
		return "", fmt.Errorf("create log directory: %w", err)
	}
	if e.ternsvc = cfg.ternsvc; e.ternsvc == "" {
		e.ternsvc = filepath.Join(e.logDir, "ternsvc")
		e.logf("building ternsvc")
		out, err := exec.Command("go", "build", "-o", e.ternsvc, "./test/bench/convergence/ternsvc").CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("build ternsvc (run from the repository root, or pass -ternsvc): %w\n%s", err, out)
		}
	}
	if e.root, err = newNSThread(-1); err != nil {
		return "", err
	}
	defer e.root.close()

	e.logf("starting etcd and kube-apiserver")
	cpOpts := controlplane.Options{StartTimeout: 2 * time.Minute}
	if cfg.logDir != "" {
		cpOpts.DataDir = filepath.Join(cfg.logDir, "controlplane")
	}
	if e.cp, err = controlplane.Start(ctx, cpOpts); err != nil {
		return "", err
	}
	defer e.cp.Stop()
	rc := e.cp.RestConfig()
	rc.QPS, rc.Burst = 5000, 10000
	if e.client, err = kubernetes.NewForConfig(rc); err != nil {
		return "", fmt.Errorf("build client: %w", err)
	}
	e.cl = newCluster(e.client, cfg.seed)

	var results []*sizeResult
	var errs []error
	for _, size := range cfg.sizes {
		r := &sizeResult{size: size, kpErr: map[string]error{}}
		e.logf("creating Services up to %d", size)
		if r.setup, err = e.cl.grow(ctx, size, cfg.workers); err != nil {
			errs = append(errs, err)
			break
		}
		e.logf("%d Services and EndpointSlices in place (%s for this step)", size, r.setup.Round(time.Millisecond))
		results = append(results, r)
		if r.tern, r.tErr = runTern(ctx, e, size); r.tErr != nil {
			e.logf("tern at %d Services failed: %v", size, r.tErr)
			errs = append(errs, fmt.Errorf("tern at %d Services: %w", size, r.tErr))
		}
		for _, mode := range cfg.modes {
			if ctx.Err() != nil {
				break
			}
			kp, err := runKubeProxy(ctx, e, size, mode)
			if err != nil {
				e.logf("kube-proxy %s at %d Services failed: %v", mode, size, err)
				r.kpErr[mode] = err
				errs = append(errs, fmt.Errorf("kube-proxy %s at %d Services: %w", mode, size, err))
			}
			if kp != nil && kp.lat.n > 0 {
				// Measured; a later cleanup error is reported but does not hide the figures.
				r.kp = append(r.kp, kp)
			}
		}
		if ctx.Err() != nil {
			break
		}
	}
	e.logf("done")
	return renderReport(e, cmdline, results, time.Since(e.began)), errors.Join(errs...)
}
