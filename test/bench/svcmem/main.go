// Command svcmem measures the memory of tern's service half at a given number of Services,
// quickly enough to run after every change: a real etcd + kube-apiserver
// (test/k8s/controlplane), N Services with one EndpointSlice of E endpoints each written
// straight into etcd (seconds, not the minutes the API takes here), then each ternsvc binary
// it is given (the agent's service controller over a real datapath under a private pin root,
// test/bench/convergence/ternsvc) started in turn against the same objects, and measured
// after its first full sync: VmRSS and VmHWM from /proc, the Go heap from its
// /debug/pprof/heap (the agent's pprofAddr code), whose profile is saved for `go tool pprof`.
//
// Give two binaries (the code before and after a change) to see both side by side in one
// run; the order rotates every repetition. Extra environment per binary (GOGC, GOMEMLIMIT)
// and ternsvc flags (-resync) follow its path:
//
//	go run ./test/bench/svcmem -ternsvc before=/tmp/ternsvc-old \
//	    -ternsvc after=/tmp/ternsvc-new -ternsvc 'after+limit=/tmp/ternsvc-new GOMEMLIMIT=80MiB'
//
// Needs root (BPF maps) and TERN_K8S_BIN_DIR (test/k8s/build.sh).
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"github.com/tern-net/tern/test/bench/procmem"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/test/k8s/controlplane"
)

type variant struct {
	label, path string
	env         []string // ENV=value
	args        []string // -flag or -flag=value, after ternsvc's own
}

type variants []variant

func (v *variants) String() string { return fmt.Sprint(*v) }
func (v *variants) Set(s string) error {
	label, rest, ok := strings.Cut(s, "=")
	f := strings.Fields(rest)
	if !ok || label == "" || len(f) == 0 {
		return fmt.Errorf("-ternsvc %q: want label=path [ENV=value ...] [-flag ...]", s)
	}
	x := variant{label: label, path: f[0]}
	for _, a := range f[1:] {
		if strings.HasPrefix(a, "-") {
			x.args = append(x.args, a)
		} else {
			x.env = append(x.env, a)
		}
	}
	*v = append(*v, x)
	return nil
}

type sample struct {
	sync                 time.Duration // process start to the first full sync's log line
	frontends            int
	rssSync, rss, hwm    uint64 // VmRSS at the sync line, VmRSS and VmHWM after settle
	heapInuse, heapAlloc uint64
	sys                  uint64 // memory the Go runtime holds from the OS
	gcs                  uint64
}

func main() {
	var vs variants
	flag.Var(&vs, "ternsvc", "label=path [ENV=value ...] [-flag ...] of a ternsvc binary to measure (repeatable; default: build this tree's as \"this\")")
	n := flag.Int("services", 10000, "Services to create")
	each := flag.Int("endpoints", 5, "endpoints per Service (one EndpointSlice)")
	shapeFlag := flag.String("shape", string(shapeRealistic), "realistic (what kubectl and the EndpointSlice controller write) or minimal (what the kubeproxy bench writes)")
	reps := flag.Int("reps", 1, "repetitions (each runs every binary once, order rotated)")
	settle := flag.Duration("settle", 10*time.Second, "how long after the full sync to read memory: the steady state, not the LIST's transient")
	out := flag.String("out", "", "directory for logs and heap profiles (default: a new temporary one, kept)")
	flag.Parse()
	sh := shape(*shapeFlag)
	if sh != shapeRealistic && sh != shapeMinimal {
		fmt.Fprintf(os.Stderr, "svcmem: -shape %q is not realistic or minimal\n", sh)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, vs, *n, *each, sh, *reps, *settle, *out); err != nil {
		fmt.Fprintln(os.Stderr, "svcmem:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, vs variants, n, each int, sh shape, reps int, settle time.Duration, out string) (retErr error) {
	if out == "" {
		d, err := os.MkdirTemp("", "svcmem-")
		if err != nil {
			return err
		}
		out = d
	} else if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	if len(vs) == 0 {
		bin := filepath.Join(out, "ternsvc")
		build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./test/bench/convergence/ternsvc")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return fmt.Errorf("build ternsvc (run from the repository root, or pass -ternsvc): %w", err)
		}
		vs = variants{{label: "this", path: bin}}
	}
	fmt.Fprintf(os.Stderr, "svcmem: logs and profiles in %s\n", out)

	cp, err := controlplane.Start(ctx, controlplane.Options{DataDir: filepath.Join(out, "controlplane")})
	if err != nil {
		return err
	}
	defer func() { retErr = errors.Join(retErr, cp.Stop()) }()
	client, err := kubernetes.NewForConfig(cp.RestConfig())
	if err != nil {
		return err
	}
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: benchNamespace}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create namespace: %w", err)
	}
	start := time.Now()
	if err := newEtcdLoader(cp.EtcdURL()).load(ctx, n, each, sh); err != nil {
		return err
	}
	wrote := time.Since(start)
	if err := waitListed(ctx, client, n, 5*time.Minute); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "svcmem: %d Services and EndpointSlices (%s) written to etcd in %s, listed by the apiserver after %s\n",
		n, sh, wrote.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))

	results := map[string][]sample{}
	for r := range reps {
		for k := range vs {
			v := vs[(k+r)%len(vs)]
			s, err := measure(ctx, v, cp.KubeconfigPath(), filepath.Join(out, fmt.Sprintf("%s-%d", v.label, r)), n, settle)
			if err != nil {
				return fmt.Errorf("%s (repetition %d): %w", v.label, r+1, err)
			}
			fmt.Fprintf(os.Stderr, "svcmem: %s rep %d: RSS %s (at sync %s, peak %s), heap in use %s\n",
				v.label, r+1, mb(s.rss), mb(s.rssSync), mb(s.hwm), mb(s.heapInuse))
			results[v.label] = append(results[v.label], s)
		}
	}
	report(os.Stdout, vs, results, n, each, sh, reps, settle)
	return nil
}

// waitListed polls until the apiserver lists n Services and n EndpointSlices in the
// namespace (its watch cache has followed etcd).
func waitListed(ctx context.Context, client kubernetes.Interface, n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		svcs, err := client.CoreV1().Services(benchNamespace).List(ctx, metav1.ListOptions{ResourceVersion: "0"})
		if err != nil {
			return fmt.Errorf("list Services: %w", err)
		}
		slices, err := client.DiscoveryV1().EndpointSlices(benchNamespace).List(ctx, metav1.ListOptions{ResourceVersion: "0"})
		if err != nil {
			return fmt.Errorf("list EndpointSlices: %w", err)
		}
		if len(svcs.Items) >= n && len(slices.Items) >= n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the apiserver lists %d Services and %d EndpointSlices after %s, want %d of each", len(svcs.Items), len(slices.Items), timeout, n)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// measure runs one ternsvc until its first full sync, waits settle, reads its memory and
// heap profile, and stops it.
func measure(ctx context.Context, v variant, kubeconfig, prefix string, n int, settle time.Duration) (s sample, retErr error) {
	var b [6]byte
	_, _ = rand.Read(b[:])
	pinRoot := "/sys/fs/bpf/tern-convbench-svcmem-" + hex.EncodeToString(b[:])
	defer func() {
		if err := loader.RemovePins(pinRoot); err != nil {
			retErr = errors.Join(retErr, err)
		}
	}()
	port, err := freePort()
	if err != nil {
		return s, err
	}
	pprof := "127.0.0.1:" + strconv.Itoa(port)
	cmd := exec.Command(v.path, append([]string{"-kubeconfig", kubeconfig, "-pin-root", pinRoot, "-pprof-addr", pprof}, v.args...)...)
	cmd.Env = append(os.Environ(), v.env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	logf, err := os.Create(prefix + ".log")
	if err != nil {
		return s, err
	}
	defer logf.Close()
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	started := time.Now()
	if err := cmd.Start(); err != nil {
		return s, fmt.Errorf("start %s: %w", v.path, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); pw.Close() }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}()
	synced := make(chan fullSync, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 1<<20), 16<<20)
		for sc.Scan() {
			fmt.Fprintln(logf, sc.Text())
			var l fullSync
			if json.Unmarshal(sc.Bytes(), &l) == nil && l.Msg == "full sync" {
				select {
				case synced <- l:
				default:
				}
			}
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	var l fullSync
	select {
	case l = <-synced:
	case err := <-exited:
		exited <- err
		return s, fmt.Errorf("%s exited before its first full sync: %v (log %s.log)", v.label, err, prefix)
	case <-time.After(5 * time.Minute):
		return s, fmt.Errorf("%s logged no full sync in 5 min (log %s.log)", v.label, prefix)
	case <-ctx.Done():
		return s, ctx.Err()
	}
	s.sync = time.Since(started)
	if l.Error != "" || l.Services < n {
		return s, fmt.Errorf("%s's first full sync: %d Services, error %q; want %d Services and no error", v.label, l.Services, l.Error, n)
	}
	s.frontends = l.Frontends
	if s.rssSync, _, err = procmem.Read(cmd.Process.Pid); err != nil {
		return s, err
	}
	select {
	case <-time.After(settle): // a measurement interval, not a synchronisation
	case <-ctx.Done():
		return s, ctx.Err()
	}
	if s.rss, s.hwm, err = procmem.Read(cmd.Process.Pid); err != nil {
		return s, err
	}
	if err := readHeap(pprof, prefix, &s); err != nil {
		return s, err
	}
	return s, nil
}

type fullSync struct {
	Msg       string `json:"msg"`
	Services  int    `json:"services"`
	Frontends int    `json:"frontends"`
	Error     string `json:"error"`
}

// readHeap saves the heap profile (prefix.heap.pb.gz) and reads the runtime's MemStats from
// the text form, which does not force a GC: the heap as the process holds it.
func readHeap(addr, prefix string, s *sample) error {
	get := func(path string) ([]byte, error) {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("GET %s: %s", path, resp.Status)
		}
		return io.ReadAll(resp.Body)
	}
	text, err := get("/debug/pprof/heap?debug=1")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(text), "\n") {
		k, val, ok := strings.Cut(strings.TrimPrefix(line, "# "), " = ")
		if !ok {
			continue
		}
		x, err := strconv.ParseUint(strings.Fields(val + " x")[0], 10, 64)
		if err != nil {
			continue
		}
		switch k {
		case "HeapInuse":
			s.heapInuse = x
		case "HeapAlloc":
			s.heapAlloc = x
		case "Sys":
			s.sys = x
		case "NumGC":
			s.gcs = x
		}
	}
	if s.heapInuse == 0 {
		return fmt.Errorf("no HeapInuse in %s's heap profile", addr)
	}
	prof, err := get("/debug/pprof/heap")
	if err != nil {
		return err
	}
	return os.WriteFile(prefix+".heap.pb.gz", prof, 0o644)
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func mb(b uint64) string { return fmt.Sprintf("%.1f MB", float64(b)/1e6) }

func median(xs []uint64) uint64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

func report(w io.Writer, vs variants, res map[string][]sample, n, each int, sh shape, reps int, settle time.Duration) {
	fmt.Fprintf(w, "%d Services × %d endpoints (%s objects), median of %d, memory read %s after the first full sync\n\n", n, each, sh, reps, settle)
	fmt.Fprintln(w, "| ternsvc | env, flags | frontends | start → full sync | RSS | RSS at sync | peak RSS | Go heap in use | Go heap allocated | Go runtime from the OS |")
	fmt.Fprintln(w, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
	seen := map[string]bool{}
	for _, v := range vs {
		if seen[v.label] {
			continue
		}
		seen[v.label] = true
		ss := res[v.label]
		pick := func(f func(sample) uint64) uint64 {
			xs := make([]uint64, len(ss))
			for i, s := range ss {
				xs[i] = f(s)
			}
			return median(xs)
		}
		env := strings.Join(append(slices.Clone(v.env), v.args...), " ")
		if env == "" {
			env = "–"
		}
		fmt.Fprintf(w, "| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s |\n", v.label, env, ss[0].frontends,
			time.Duration(pick(func(s sample) uint64 { return uint64(s.sync) })).Round(10*time.Millisecond),
			mb(pick(func(s sample) uint64 { return s.rss })), mb(pick(func(s sample) uint64 { return s.rssSync })),
			mb(pick(func(s sample) uint64 { return s.hwm })), mb(pick(func(s sample) uint64 { return s.heapInuse })),
			mb(pick(func(s sample) uint64 { return s.heapAlloc })), mb(pick(func(s sample) uint64 { return s.sys })))
	}
}
