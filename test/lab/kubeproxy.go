//go:build linux

package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/test/k8s/controlplane"
)

// PodCIDR is the lab's pod vSwitch, kube-proxy's --cluster-cidr: traffic to a Service from
// outside it (a host-network process, an external client) is masqueraded.
const PodCIDR = "192.168.16.0/20"

// kube-proxy's own endpoints, on the loopback of the node namespace it runs in.
const (
	kubeProxyHealthz = "127.0.0.1:10256"
	kubeProxyMetrics = "127.0.0.1:10249"
)

// KubeProxy is the real kube-proxy running in one node's namespace (Options.ExternalProxy).
type KubeProxy struct {
	node   *Node
	mode   string
	bin    string
	log    string
	cmd    *exec.Cmd
	exited chan struct{}
	err    error
}

// StartKubeProxy runs the real kube-proxy (test/k8s/build.sh's binary) in mode ("iptables"
// or "nftables") inside node n's namespace and waits until it has synced its rules once
// (its /healthz answers 200). It is forked from the node's launcher thread, so every rule,
// sysctl and conntrack entry it writes is the node namespace's: the root namespace is never
// touched. The flags pin it to the node: its Node name, its primary address, NodePorts on
// that address only, and global conntrack limits left as they are.
func (l *Lab) StartKubeProxy(ctx context.Context, n *Node, mode string) (*KubeProxy, error) {
	if l.kube == nil || !l.opts.ExternalProxy {
		return nil, errors.New("lab: kube-proxy needs a lab with Kubernetes and ExternalProxy (the agents must leave Services alone)")
	}
	if mode != "iptables" && mode != "nftables" {
		return nil, fmt.Errorf("lab: kube-proxy mode %q: want iptables or nftables", mode)
	}
	binDir := l.opts.KubernetesBinDir
	if binDir == "" {
		d, err := controlplane.BinDir()
		if err != nil {
			return nil, fmt.Errorf("lab: %w", err)
		}
		binDir = d
	}
	k := &KubeProxy{node: n, mode: mode, bin: filepath.Join(binDir, "kube-proxy"),
		log: filepath.Join(n.dir, "kube-proxy-"+mode+".log"), exited: make(chan struct{})}
	if _, err := os.Stat(k.bin); err != nil {
		return nil, fmt.Errorf("lab: kube-proxy not found (build it with make k8s-bins): %w", err)
	}
	logf, err := os.OpenFile(k.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lab: kube-proxy log: %w", err)
	}
	k.cmd = exec.Command(k.bin,
		"--kubeconfig="+l.KubeconfigPath(),
		"--hostname-override="+n.Name,
		"--bind-address="+n.PrimaryIP,
		"--proxy-mode="+mode,
		"--cluster-cidr="+PodCIDR,
		"--nodeport-addresses=primary",
		// Global (not per-namespace) conntrack settings stay as they are.
		"--conntrack-max-per-core=0",
		"--conntrack-tcp-timeout-established=0",
		"--conntrack-tcp-timeout-close-wait=0",
		"--metrics-bind-address="+kubeProxyMetrics,
		"--healthz-bind-address="+kubeProxyHealthz,
		"-v=2")
	k.cmd.Stdout, k.cmd.Stderr = logf, logf
	k.cmd.Env = cleanEnv()
	k.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := n.launch(k.cmd); err != nil {
		logf.Close()
		return nil, fmt.Errorf("lab: start kube-proxy (%s) on %s: %w", mode, n.Name, err)
	}
	go func() {
		k.err = k.cmd.Wait()
		logf.Close()
		close(k.exited)
	}()
	l.log.Info("kube-proxy started", zap.String("node", n.Name), zap.String("mode", mode), zap.Int("pid", k.cmd.Process.Pid))
	if err := k.waitHealthy(ctx); err != nil {
		_ = k.Stop()
		return nil, err
	}
	return k, nil
}

// Log is kube-proxy's log file.
func (k *KubeProxy) Log() string { return k.log }

// PID is kube-proxy's process ID (0 once stopped), to read its memory.
func (k *KubeProxy) PID() int {
	if k.cmd == nil {
		return 0
	}
	return k.cmd.Process.Pid
}

// Mode is the proxy mode.
func (k *KubeProxy) Mode() string { return k.mode }

// waitHealthy polls kube-proxy's /healthz inside the node namespace until it answers 200,
// which it does once its first full sync has written the rules.
func (k *KubeProxy) waitHealthy(ctx context.Context) error {
	deadline := time.Now().Add(60 * time.Second)
	var last string
	for {
		code, err := k.healthz(ctx)
		if err == nil && code == http.StatusOK {
			return nil
		}
		last = fmt.Sprintf("HTTP %d, %v", code, err)
		select {
		case <-k.exited:
			return fmt.Errorf("lab: kube-proxy (%s) on %s exited during start-up (%v); see %s", k.mode, k.node.Name, k.err, k.log)
		case <-ctx.Done():
			return fmt.Errorf("lab: waiting for kube-proxy (%s) on %s: %w (last: %s)", k.mode, k.node.Name, ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: kube-proxy (%s) on %s not healthy after 60s (last: %s); see %s", k.mode, k.node.Name, last, k.log)
		}
	}
}

func (k *KubeProxy) healthz(ctx context.Context) (int, error) {
	var c net.Conn
	if err := nsutil.Do(k.node.NS, func() (err error) {
		c, err = (&net.Dialer{Timeout: time.Second}).DialContext(ctx, "tcp4", kubeProxyHealthz)
		return err
	}); err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := fmt.Fprintf(c, "GET /healthz HTTP/1.0\r\nHost: %s\r\n\r\n", kubeProxyHealthz); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// Stop stops kube-proxy (SIGTERM, SIGKILL after 10 s) and then runs `kube-proxy --cleanup`
// in the node namespace, as an operator switching proxies does, so that nothing of it is
// left for the next proxy. Stopping twice is a no-op.
func (k *KubeProxy) Stop() error {
	if k.cmd == nil {
		return nil
	}
	_ = k.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-k.exited:
	case <-time.After(10 * time.Second):
		_ = k.cmd.Process.Kill()
		<-k.exited
	}
	k.cmd = nil
	out, err := k.node.RunInNode(context.Background(), k.bin, "--cleanup", "-v=0")
	if err != nil {
		return fmt.Errorf("lab: kube-proxy --cleanup on %s after %s: %w: %s", k.node.Name, k.mode, err, out)
	}
	return nil
}

// RunInNode runs a short command inside the node's namespace (forked from its launcher
// thread) and returns its combined output.
func (n *Node) RunInNode(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.Env = cleanEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := n.launch(cmd); err != nil {
		return "", fmt.Errorf("start %s in %s: %w", name, n.Name, err)
	}
	err := cmd.Wait()
	return out.String(), err
}
