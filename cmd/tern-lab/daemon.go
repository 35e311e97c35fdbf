//go:build linux

package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/tern-net/tern/test/lab"
)

// upFlags are shared by `up` and the daemon it starts.
type upFlags struct {
	dir       string
	nodes     int
	binDir    string
	k8sBinDir string
}

func (f *upFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.dir, "dir", defaultDir, "lab directory: control socket, log, kubeconfig, state")
	fs.IntVar(&f.nodes, "nodes", 2, "number of nodes")
	fs.StringVar(&f.binDir, "bin-dir", "", "directory with tern-agent and tern-cni (default: tern-lab's own directory)")
	fs.StringVar(&f.k8sBinDir, "k8s-bin-dir", "", "directory with etcd, kube-apiserver, kube-controller-manager (default: $TERN_K8S_BIN_DIR or test/k8s/build.sh's cache)")
}

func (f *upFlags) args() []string {
	return []string{"-dir", f.dir, "-nodes", fmt.Sprint(f.nodes), "-bin-dir", f.binDir, "-k8s-bin-dir", f.k8sBinDir}
}

// cmdUp starts the daemon in its own session and returns once the lab is ready: the lab owns
// namespaces, processes and the control plane, so a process must outlive this command.
func cmdUp(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	var f upFlags
	f.register(fs)
	timeout := fs.Duration("timeout", 5*time.Minute, "how long to wait for the lab to be ready")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if f.binDir == "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("find tern-lab's own path (pass -bin-dir): %w", err)
		}
		f.binDir = filepath.Dir(exe)
	}
	for _, b := range []string{"tern-agent", "tern-cni"} {
		if _, err := os.Stat(filepath.Join(f.binDir, b)); err != nil {
			return fmt.Errorf("%s not found in %s: build the binaries (make build) or pass -bin-dir", b, f.binDir)
		}
	}
	if st, err := readState(f.dir); err == nil {
		if alive(st.PID) {
			return fmt.Errorf("a lab is already up in %s (daemon pid %d): use it, or run `tern-lab down -dir %s` first", f.dir, st.PID, f.dir)
		}
		fmt.Printf("cleaning up after a lab daemon (pid %d) that is gone\n", st.PID)
		if err := cleanLeftovers(f.dir); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(f.dir, 0o700); err != nil {
		return fmt.Errorf("create lab directory: %w", err)
	}
	logPath := filepath.Join(f.dir, logFile)
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("open %s: %w", logPath, err)
	}
	defer logf.Close()
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.Command(exe, append([]string{"daemon"}, f.args()...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// A new session: no controlling terminal, so closing the shell or ^C does not reach it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = "/"
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start the lab daemon: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	fmt.Printf("starting a %d-node lab (daemon pid %d, log %s) ...\n", f.nodes, cmd.Process.Pid, logPath)

	began := time.Now()
	c := newClient(f.dir, 5*time.Second)
	deadline := time.After(*timeout)
	for {
		st, err := c.status(ctx)
		if err == nil {
			fmt.Printf("lab up in %s\n\n", time.Since(began).Round(100*time.Millisecond))
			printStatus(st)
			return nil
		}
		select {
		case err := <-exited:
			tail := tailFile(logPath, 30)
			_ = os.RemoveAll(f.dir)
			return fmt.Errorf("the lab daemon exited during start-up (%v); its log:\n%s", err, tail)
		case <-deadline:
			return fmt.Errorf("the lab is not ready after %s; see %s, then run `tern-lab down -dir %s`", *timeout, logPath, f.dir)
		case <-ctx.Done():
			return fmt.Errorf("interrupted while the lab starts; run `tern-lab down -dir %s`", f.dir)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// daemon runs the lab until `down` or SIGTERM.
type daemon struct {
	dir      string
	lab      *lab.Lab
	external *lab.External
	log      *zap.Logger
	down     chan chan error // a `down` request; the daemon answers once the lab is gone
	mu       sync.Mutex      // serialises pod creation's node choice
}

func cmdDaemon(ctx context.Context, args []string) (retErr error) {
	fs := flag.NewFlagSet("daemon", flag.ContinueOnError)
	var f upFlags
	f.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	zc := zap.NewProductionConfig()
	zc.Encoding = "console"
	zc.EncoderConfig.EncodeTime = zapcore.TimeEncoderOfLayout("15:04:05.000")
	log, err := zc.Build()
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	d := &daemon{dir: f.dir, log: log, down: make(chan chan error)}

	st := state{PID: os.Getpid(), PinRoot: filepath.Join("/sys/fs/bpf", fmt.Sprintf("tern-lab-%d", os.Getpid())),
		LabDir: filepath.Join(f.dir, labSubdir)}
	if err := writeFileAtomic(filepath.Join(f.dir, stateFile), st); err != nil {
		return err
	}
	defer func() {
		if retErr != nil {
			// Keep the log for `up` to show; the rest is ours to remove.
			for _, name := range []string{stateFile, socketFile, kubeconfigFile} {
				_ = os.Remove(filepath.Join(f.dir, name))
			}
			log.Error("lab daemon failed", zap.Error(retErr))
		}
	}()

	upCtx, cancel := context.WithTimeout(ctx, 4*time.Minute)
	l, err := lab.Up(upCtx, lab.Options{Nodes: f.nodes, BinDir: f.binDir, Dir: st.LabDir, PinRoot: st.PinRoot,
		Kubernetes: true, KubernetesBinDir: f.k8sBinDir, Logger: log.Named("lab"), SocketLB: true,
		ENIConf: lab.ENIConf{MinPoolSize: 2, MaxPoolSize: 8}})
	cancel()
	if err != nil {
		return err
	}
	d.lab = l
	stopped := false
	defer func() {
		if !stopped {
			_ = l.Down()
		}
	}()
	// The socket-LB cgroups are the lab's to remove too if this daemon dies.
	st.Cgroup = filepath.Dir(l.Node(0).Cgroup())
	if err := writeFileAtomic(filepath.Join(f.dir, stateFile), st); err != nil {
		return err
	}
	if d.external, err = l.ExternalClient(); err != nil {
		return err
	}
	kc, err := os.ReadFile(l.KubeconfigPath())
	if err != nil {
		return fmt.Errorf("read the lab's kubeconfig: %w", err)
	}
	if err := os.WriteFile(filepath.Join(f.dir, kubeconfigFile), kc, 0o600); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}

	sock := filepath.Join(f.dir, socketFile)
	_ = os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", sock, err)
	}
	if err := os.Chmod(sock, 0o600); err != nil {
		ln.Close()
		return err
	}
	srv := &http.Server{Handler: d.routes(), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	log.Info("lab ready", zap.String("socket", sock), zap.String("kubeconfig", filepath.Join(f.dir, kubeconfigFile)))

	var reply chan error
	select {
	case <-ctx.Done():
		log.Info("signal: tearing the lab down")
	case reply = <-d.down:
		log.Info("down requested: tearing the lab down")
	}
	err = l.Down()
	stopped = true
	if err != nil {
		log.Error("lab down", zap.Error(err))
	}
	if reply != nil {
		reply <- err
	}
	shCtx, shCancel := context.WithTimeout(context.Background(), 10*time.Second)
	_ = srv.Shutdown(shCtx)
	shCancel()
	// Everything else in the directory is ours; the log goes too, so nothing is left.
	if rmErr := os.RemoveAll(f.dir); rmErr != nil {
		err = errors.Join(err, rmErr)
	}
	return err
}

func (d *daemon) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) { reply(w, d.status(), nil) })
	mux.HandleFunc("POST /v1/pods", d.runPod)
	mux.HandleFunc("DELETE /v1/pods/{ns}/{name}", d.deletePod)
	mux.HandleFunc("POST /v1/ask", d.ask)
	mux.HandleFunc("POST /v1/down", func(w http.ResponseWriter, r *http.Request) {
		done := make(chan error, 1)
		select {
		case d.down <- done:
		case <-r.Context().Done():
			return
		}
		reply(w, map[string]string{"result": "down"}, <-done)
	})
	return mux
}

func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		w.WriteHeader(http.StatusInternalServerError)
		_ = json.NewEncoder(w).Encode(apiError{Error: err.Error()})
		return
	}
	_ = json.NewEncoder(w).Encode(v)
}

func (d *daemon) status() Status {
	l := d.lab
	s := Status{PID: os.Getpid(), Dir: d.dir, Kubeconfig: filepath.Join(d.dir, kubeconfigFile), PinRoot: l.PinRoot(),
		Emulator: l.EmulatorAddr(), Pods: []PodInfo{}}
	if cp := l.ControlPlane(); cp != nil {
		s.APIServer = cp.APIServerURL()
	}
	for _, n := range l.Nodes() {
		s.Nodes = append(s.Nodes, NodeInfo{Name: n.Name, InstanceID: n.InstanceID, PrimaryIP: n.PrimaryIP, AgentPID: n.AgentPID(),
			PinRoot: n.PinRoot(), Socket: n.Socket(), AgentLog: n.AgentLog(), NetNS: n.NetNSPath(), Cgroup: n.Cgroup()})
	}
	if d.external != nil {
		s.External = ExternalInfo{IP: d.external.IP.String(), NetNS: fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), int(d.external.NS()))}
	}
	for _, p := range l.Pods() {
		s.Pods = append(s.Pods, podInfo(p))
	}
	return s
}

func podInfo(p *lab.Pod) PodInfo {
	return PodInfo{Namespace: p.Namespace, Name: p.Name, UID: p.UID, Node: p.Node.Name, IP: p.IP.String(), NetNS: p.NetNSPath()}
}

func (d *daemon) runPod(w http.ResponseWriter, r *http.Request) {
	var req PodRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		reply(w, nil, fmt.Errorf("bad pod request: %w", err))
		return
	}
	if req.Name == "" {
		reply(w, nil, errors.New("a pod needs a name"))
		return
	}
	if req.Node == "" {
		req.Node = d.leastLoadedNode()
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Minute)
	defer cancel()
	p, err := d.lab.RunPod(ctx, lab.PodSpec{Namespace: req.Namespace, Name: req.Name, Node: req.Node, Labels: req.Labels,
		HTTPPort: req.HTTPPort, ServePort: req.ServePort})
	if err != nil {
		reply(w, nil, err)
		return
	}
	reply(w, podInfo(p), nil)
}

// leastLoadedNode is where a pod without a node goes: a one-line scheduler.
func (d *daemon) leastLoadedNode() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	count := map[string]int{}
	for _, p := range d.lab.Pods() {
		count[p.Node.Name]++
	}
	nodes := d.lab.Nodes()
	best := nodes[0].Name
	for _, n := range nodes {
		if count[n.Name] < count[best] {
			best = n.Name
		}
	}
	return best
}

func (d *daemon) deletePod(w http.ResponseWriter, r *http.Request) {
	ns, name := r.PathValue("ns"), r.PathValue("name")
	p := d.lab.Pod(ns, name)
	if p == nil {
		w.WriteHeader(http.StatusNotFound)
		_ = json.NewEncoder(w).Encode(apiError{Error: fmt.Sprintf("no pod %s/%s in the lab (tern-lab status lists them)", ns, name)})
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
	defer cancel()
	reply(w, podInfo(p), d.lab.DeletePod(ctx, p))
}

func (d *daemon) ask(w http.ResponseWriter, r *http.Request) {
	var req AskRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		reply(w, nil, fmt.Errorf("bad ask request: %w", err))
		return
	}
	p := d.lab.Pod(req.Namespace, req.Pod)
	if p == nil {
		reply(w, nil, fmt.Errorf("no pod %s/%s in the lab (tern-lab status lists them)", req.Namespace, req.Pod))
		return
	}
	if req.Count <= 0 {
		req.Count = 1
	}
	res := AskResult{Answers: []string{}, Errors: []string{}}
	for range req.Count {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		var ans string
		var err error
		if req.TCP {
			ans, err = p.Ask(ctx, req.Addr, "hello")
		} else {
			ans, err = p.HTTPGet(ctx, "http://"+req.Addr+"/")
		}
		cancel()
		if err != nil {
			res.Errors = append(res.Errors, err.Error())
			continue
		}
		res.Answers = append(res.Answers, ans)
	}
	reply(w, res, nil)
}

func printStatus(s *Status) {
	fmt.Printf("daemon pid %d, directory %s\n", s.PID, s.Dir)
	fmt.Printf("apiserver %s, kubeconfig %s\n", s.APIServer, s.Kubeconfig)
	fmt.Printf("pins under %s, ECS emulator %s\n\n", s.PinRoot, s.Emulator)
	w := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NODE\tINSTANCE\tPRIMARY IP\tAGENT PID\tNETNS (nsenter --net=...)")
	for _, n := range s.Nodes {
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\n", n.Name, n.InstanceID, n.PrimaryIP, n.AgentPID, n.NetNS)
	}
	if s.External.IP != "" {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", externalName, "(outside the VPC)", s.External.IP, "-", s.External.NetNS)
	}
	w.Flush()
	if len(s.Pods) == 0 {
		return
	}
	pods := append([]PodInfo(nil), s.Pods...)
	sort.Slice(pods, func(i, j int) bool { return pods[i].Namespace+"/"+pods[i].Name < pods[j].Namespace+"/"+pods[j].Name })
	fmt.Println()
	fmt.Fprintln(w, "POD\tNODE\tIP\tNETNS")
	for _, p := range pods {
		fmt.Fprintf(w, "%s/%s\t%s\t%s\t%s\n", p.Namespace, p.Name, p.Node, p.IP, p.NetNS)
	}
	w.Flush()
}

// alive reports whether pid is a running tern-lab daemon (not a recycled pid).
func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	return len(args) > 1 && strings.HasSuffix(args[0], "tern-lab") && args[1] == "daemon"
}

func writeFileAtomic(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	return os.Rename(tmp, path)
}

func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// signalContext ends on SIGINT or SIGTERM.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}
