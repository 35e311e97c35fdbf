//go:build linux

package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/k8s/nsbridge"
)

// Node is one ECS instance of the lab: a network namespace with its agent.
type Node struct {
	lab        *Lab
	Index      int
	Name       string // Kubernetes node name, node-1…
	InstanceID string // i-lab-0001…
	PrimaryIP  string // the primary ENI's address, the Node's InternalIP
	NS         netns.NsHandle
	dir        string
	bridge     *nsbridge.Bridge // the emulator, on the same 127.0.0.1 port inside NS
	apiBridge  *nsbridge.Bridge // the apiserver likewise (Kubernetes labs only)
	kubeconfig string           // from Options.AgentKubeconfig; empty: the admin kubeconfig

	launches chan launchReq // served by a thread locked into NS for the node's lifetime
	mu       sync.Mutex
	agent    *exec.Cmd
	exited   chan struct{}
	eniCfg   ENIConf
	cni      *libcni.CNIConfig
	list     *libcni.NetworkConfigList
}

// Socket is the agent's unix socket.
func (n *Node) Socket() string { return filepath.Join(n.dir, "agent.sock") }

// AgentLog is the file the agent's logs go to (appended across restarts).
func (n *Node) AgentLog() string { return filepath.Join(n.dir, "agent.log") }

// PinRoot is the bpffs directory of the node's datapath.
func (n *Node) PinRoot() string { return filepath.Join(n.lab.pinRoot, n.Name) }

// Cgroup is the cgroup v2 directory the node's agent attaches the socket hooks to
// (Options.SocketLB); empty without socket LB.
func (n *Node) Cgroup() string {
	if n.lab.cgroup == "" {
		return ""
	}
	return filepath.Join(n.lab.cgroup, n.Name)
}

// ConfDir is the node's CNI configuration directory (holds 10-tern.conflist).
func (n *Node) ConfDir() string { return filepath.Join(n.dir, "net.d") }

func (n *Node) eniConfPath() string { return filepath.Join(n.dir, "eni_conf") }

// Client talks to the node's agent.
func (n *Node) Client() *api.Client { return api.NewClient(n.Socket(), 30*time.Second) }

// prepare writes the node's files and bridges the emulator into its namespace.
func (n *Node) prepare() error {
	for _, d := range []string{n.dir, n.ConfDir(), filepath.Join(n.dir, "cni-cache")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("lab: create %s: %w", d, err)
		}
	}
	if err := n.UpdateENIConf(n.lab.opts.ENIConf); err != nil {
		return err
	}
	cfg := n.agentConfig()
	if n.lab.opts.AgentConfig != nil {
		n.lab.opts.AgentConfig(n, &cfg)
	}
	if err := n.checkListingGrace(cfg); err != nil {
		return err
	}
	if err := writeJSON(filepath.Join(n.dir, "agent.json"), cfg); err != nil {
		return err
	}
	conflist := map[string]any{
		"cniVersion": "1.1.0",
		"name":       NetworkName,
		"plugins": []map[string]any{{
			"type":   "tern-cni",
			"socket": n.Socket(),
			"capabilities": map[string]bool{
				"portMappings": true, "bandwidth": true, "io.kubernetes.cri.pod-annotations": true,
			},
		}},
	}
	path := filepath.Join(n.ConfDir(), "10-tern.conflist")
	if err := writeJSON(path, conflist); err != nil {
		return err
	}
	// Load it back the way containerd does: the first conflist of the directory.
	files, err := libcni.ConfFiles(n.ConfDir(), []string{".conflist"})
	if err != nil || len(files) == 0 {
		return fmt.Errorf("lab: find conflist in %s: %v", n.ConfDir(), err)
	}
	if n.list, err = libcni.ConfListFromFile(files[0]); err != nil {
		return fmt.Errorf("lab: load %s: %w", files[0], err)
	}
	return n.wire()
}

// wire connects the lab to the node's namespace: CNI calls, the agent launcher and the
// emulator and apiserver bridges all run inside NS. A node rebuilt with a fresh namespace
// (Node.Boot) is wired again.
func (n *Node) wire() error {
	n.cni = libcni.NewCNIConfigWithCacheDir([]string{n.lab.opts.BinDir}, filepath.Join(n.dir, "cni-cache"), &nodeExec{ns: n.NS})
	if err := n.startLauncher(); err != nil {
		return err
	}
	b, err := nsbridge.Start(nsbridge.Config{NS: n.NS, Target: n.lab.emuAddr, Logger: n.lab.log.Named("nsbridge")})
	if err != nil {
		return fmt.Errorf("lab: bridge the emulator into %s: %w", n.Name, err)
	}
	n.bridge = b
	if k := n.lab.kube; k != nil {
		target := strings.TrimPrefix(k.cp.APIServerURL(), "https://")
		if n.apiBridge, err = nsbridge.Start(nsbridge.Config{NS: n.NS, Target: target, Logger: n.lab.log.Named("nsbridge")}); err != nil {
			return fmt.Errorf("lab: bridge the apiserver into %s: %w", n.Name, err)
		}
	}
	return nil
}

// MetricsPort is where a Kubernetes lab's agents also serve /metrics, /healthz and /readyz,
// on 127.0.0.1 inside their node namespace (the agent socket serves them too).
const MetricsPort = 9464

func (n *Node) metricsAddr() string {
	if n.lab.kube == nil {
		return ""
	}
	return fmt.Sprintf("127.0.0.1:%d", MetricsPort)
}

// kubeconfigPath is the agent's kubeconfig: Options.AgentKubeconfig's, else the admin one.
func (n *Node) kubeconfigPath() string {
	if n.kubeconfig != "" {
		return n.kubeconfig
	}
	return n.lab.KubeconfigPath()
}

// NetNSPath is a path to the node's namespace (the lab process's file descriptor), usable
// with nsenter --net=PATH while the lab runs.
func (n *Node) NetNSPath() string { return nsPath(n.NS) }

// UpdateENIConf rewrites the node's eni_conf; the agent's watcher picks the change up.
func (n *Node) UpdateENIConf(c ENIConf) error {
	n.mu.Lock()
	n.eniCfg = c
	n.mu.Unlock()
	doc := map[string]any{
		"region_id":                ecsemu.TestRegion,
		"access_key":               ecsemu.TestAccessKeyID,
		"access_secret":            ecsemu.TestAccessKeySecret,
		"vswitches":                map[string][]string{Zone: c.VSwitches},
		"security_group":           SecurityGroup,
		"min_pool_size":            c.MinPoolSize,
		"max_pool_size":            c.MaxPoolSize,
		"vswitch_selection_policy": "ordered",
	}
	if c.ServiceCIDR != "" {
		doc["service_cidr"] = c.ServiceCIDR
	}
	if c.EnableENITrunking {
		doc["enable_eni_trunking"] = true
	}
	return writeJSON(n.eniConfPath(), doc)
}

// ENIConf is the node's current eni_conf.
func (n *Node) ENIConf() ENIConf {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.eniCfg
}

// StartAgent starts the node's tern-agent inside the node namespace and waits until it
// reports ready (CNI STATUS's answer: the pool serves and every datapath component has
// synced). The process is forked from an OS thread switched into the namespace, so it
// inherits that namespace, as a hostNetwork DaemonSet pod would run in the node's.
func (n *Node) StartAgent(ctx context.Context) error {
	exited, err := n.LaunchAgent()
	if err != nil {
		return err
	}
	return n.waitReady(ctx, exited)
}

// LaunchAgent starts the node's tern-agent like StartAgent but does not wait for it: a test
// can watch its start-up. The returned channel closes when the process exits.
func (n *Node) LaunchAgent() (<-chan struct{}, error) {
	n.mu.Lock()
	if n.agent != nil {
		n.mu.Unlock()
		return nil, fmt.Errorf("lab: the agent of %s is already running", n.Name)
	}
	logf, err := os.OpenFile(n.AgentLog(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		n.mu.Unlock()
		return nil, fmt.Errorf("lab: open agent log: %w", err)
	}
	argv := []string{filepath.Join(n.lab.opts.BinDir, "tern-agent"), "-config", filepath.Join(n.dir, "agent.json")}
	if caps := n.lab.opts.AgentCapabilities; len(caps) > 0 {
		pre, err := setprivArgs(caps)
		if err != nil {
			n.mu.Unlock()
			logf.Close()
			return nil, err
		}
		argv = append(pre, argv...)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = cleanEnv()
	// The agent dies with the lab process even if Down never runs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := n.launch(cmd); err != nil {
		n.mu.Unlock()
		logf.Close()
		return nil, fmt.Errorf("lab: start tern-agent of %s: %w", n.Name, err)
	}
	exited := make(chan struct{})
	n.agent, n.exited = cmd, exited
	n.mu.Unlock()
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(exited)
	}()
	n.lab.log.Info("agent started", zap.String("node", n.Name), zap.Int("pid", cmd.Process.Pid))
	return exited, nil
}

// setprivArgs is the setpriv prefix that leaves a root process only caps: the bounding set
// is cut to them and nothing is inheritable or ambient, so after exec the agent's permitted
// and effective sets are exactly caps (a root exec gets its bounding set).
func setprivArgs(caps []string) ([]string, error) {
	path, err := exec.LookPath("setpriv")
	if err != nil {
		return nil, fmt.Errorf("lab: AgentCapabilities needs setpriv (util-linux): %w", err)
	}
	bounding := "-all"
	for _, c := range caps {
		bounding += ",+" + strings.ToLower(strings.TrimPrefix(strings.ToUpper(c), "CAP_"))
	}
	return []string{path, "--bounding-set", bounding, "--inh-caps", "-all", "--ambient-caps", "-all", "--"}, nil
}

// AgentCapabilities returns the running agent's effective capability set, read from
// /proc/PID/status (CapEff), so a test can show the agent runs with what it was given.
func (n *Node) AgentCapabilities() (uint64, error) {
	n.mu.Lock()
	cmd := n.agent
	n.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return 0, fmt.Errorf("lab: the agent of %s is not running", n.Name)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	if err != nil {
		return 0, fmt.Errorf("lab: read the agent's status: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, fmt.Errorf("lab: no CapEff in /proc/%d/status", cmd.Process.Pid)
}

// tail returns at most the last n bytes of a file, for error messages.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// cleanEnv drops proxy variables: the agent's cloud endpoint is a loopback address.
func cleanEnv() []string {
	var out []string
	for _, kv := range os.Environ() {
		switch {
		case len(kv) > 10 && (kv[:10] == "HTTP_PROXY" || kv[:10] == "http_proxy"),
			len(kv) > 11 && (kv[:11] == "HTTPS_PROXY" || kv[:11] == "https_proxy"),
			len(kv) > 9 && (kv[:9] == "ALL_PROXY" || kv[:9] == "all_proxy"):
			continue
		}
		out = append(out, kv)
	}
	return out
}

func (n *Node) waitReady(ctx context.Context, exited <-chan struct{}) error {
	c := api.NewClient(n.Socket(), 2*time.Second)
	deadline := time.Now().Add(90 * time.Second)
	for {
		st, err := c.Status(ctx)
		if err == nil && st.Ready {
			return nil
		}
		select {
		case <-exited:
			// The lab's directory goes with a failed Up: quote the log's end here.
			return fmt.Errorf("lab: tern-agent of %s exited during start-up; the end of %s:\n%s", n.Name, n.AgentLog(), tail(n.AgentLog(), 3000))
		case <-ctx.Done():
			return fmt.Errorf("lab: waiting for tern-agent of %s: %w", n.Name, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: tern-agent of %s not ready after 90s (last: %+v, %v); see %s", n.Name, st, err, n.AgentLog())
		}
	}
}

// AgentPID is the running agent's process ID, 0 when none runs.
func (n *Node) AgentPID() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.agent == nil {
		return 0
	}
	return n.agent.Process.Pid
}

// KillAgent kills the agent with SIGKILL (no clean-up on its side) and waits for it to exit.
func (n *Node) KillAgent() error { return n.stopAgent(syscall.SIGKILL) }

// StopAgent stops the agent with SIGTERM (SIGKILL after 15 s). Stopping a stopped agent is a
// no-op.
func (n *Node) StopAgent() error { return n.stopAgent(syscall.SIGTERM) }

func (n *Node) stopAgent(sig syscall.Signal) error {
	n.mu.Lock()
	cmd, exited := n.agent, n.exited
	n.agent = nil
	n.mu.Unlock()
	if cmd == nil {
		return nil
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-exited:
		return nil
	case <-time.After(15 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
		return fmt.Errorf("lab: tern-agent of %s ignored %s for 15s and was killed", n.Name, sig)
	}
}

type launchReq struct {
	cmd  *exec.Cmd
	done chan error
}

// startLauncher starts the goroutine that forks the node's agents. It holds its OS thread in
// the node namespace until closeLauncher: a child inherits the netns of the forking thread,
// and its parent-death signal fires when that thread exits, so the agent must be forked from
// a thread that lives exactly as long as the node.
//
// When it ends, the thread goes back to the namespace it came from before the goroutine exits
// still locked. The runtime ends a thread whose goroutine exits locked — except the process's
// main thread, which it cannot end and parks for good instead: had the launcher run there, that
// thread would hold the node's namespace for the life of the process, and a crashed node's
// namespace (Node.Crash) would never go (seen: Crash named the test binary's main thread,
// /proc/PID/task/PID, as what held it).
func (n *Node) startLauncher() error {
	n.launches = make(chan launchReq)
	ready := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Never unlocked: the thread ends with the goroutine.
		orig, err := netns.Get()
		if err != nil {
			ready <- fmt.Errorf("lab: the launcher's namespace before entering %s: %w", n.Name, err)
			return
		}
		defer orig.Close()
		if err := netns.Set(n.NS); err != nil {
			ready <- fmt.Errorf("lab: enter namespace of %s: %w", n.Name, err)
			return
		}
		ready <- nil
		for r := range n.launches {
			r.done <- r.cmd.Start()
		}
		if err := netns.Set(orig); err != nil {
			n.lab.log.Error("the launcher thread could not leave the node's namespace: if it is the main thread, it holds the namespace until the process ends",
				zap.String("node", n.Name), zap.Error(err))
		}
	}()
	return <-ready
}

func (n *Node) launch(cmd *exec.Cmd) error {
	done := make(chan error, 1)
	n.launches <- launchReq{cmd: cmd, done: done}
	return <-done
}

func (n *Node) closeLauncher() {
	if n.launches != nil {
		close(n.launches)
		n.launches = nil
	}
}

// Status runs CNI STATUS on the node through libcni.
func (n *Node) Status(ctx context.Context) error { return n.cni.GetStatusNetworkList(ctx, n.list) }

func (n *Node) gc(ctx context.Context, valid []types.GCAttachment) error {
	return n.cni.GCNetworkList(ctx, n.list, &libcni.GCArgs{ValidAttachments: valid})
}

// nodeExec runs CNI plugins inside the node's namespace, as a runtime on that node would,
// by forking them from a thread switched into it. Everything else is libcni's own exec.
type nodeExec struct {
	ns  netns.NsHandle
	raw invoke.RawExec
	dec version.PluginDecoder
}

func (e *nodeExec) ExecPlugin(ctx context.Context, pluginPath string, stdinData []byte, environ []string) ([]byte, error) {
	var out []byte
	var perr error
	err := nsutil.Do(e.ns, func() error {
		out, perr = e.raw.ExecPlugin(ctx, pluginPath, stdinData, environ)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, perr
}

func (e *nodeExec) FindInPath(plugin string, paths []string) (string, error) {
	return e.raw.FindInPath(plugin, paths)
}

func (e *nodeExec) Decode(jsonBytes []byte) (version.PluginInfo, error) {
	return e.dec.Decode(jsonBytes)
}

// CNIError returns err's CNI error, if it is one.
func CNIError(err error) (*types.Error, bool) {
	var te *types.Error
	if errors.As(err, &te) {
		return te, true
	}
	return nil, false
}

// PluginConf is the tern-cni network configuration as libcni hands it to the plugin (the
// conflist's plugin entry with the list's name and cniVersion).
func (n *Node) PluginConf() []byte {
	var m map[string]any
	_ = json.Unmarshal(n.list.Plugins[0].Bytes, &m)
	m["name"], m["cniVersion"] = n.list.Name, n.list.CNIVersion
	b, _ := json.Marshal(m)
	return b
}

// ExecCNI runs tern-cni in the node's namespace with exactly the CNI_* variables in env and
// stdin as given, for inputs libcni would never produce. A plugin error comes back as a
// *types.Error.
func (n *Node) ExecCNI(ctx context.Context, env map[string]string, stdin []byte) ([]byte, error) {
	environ := []string{"CNI_PATH=" + n.lab.opts.BinDir, "PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	for k, v := range env {
		environ = append(environ, k+"="+v)
	}
	e := &nodeExec{ns: n.NS}
	return e.ExecPlugin(ctx, filepath.Join(n.lab.opts.BinDir, "tern-cni"), stdin, environ)
}
