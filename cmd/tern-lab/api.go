//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// Files in the lab directory (-dir). The daemon owns them; down removes them all.
const (
	socketFile     = "lab.sock"   // the control API (HTTP over a unix socket)
	logFile        = "lab.log"    // the daemon's log (the lab's, the emulator's, the control plane's lifecycle)
	stateFile      = "state.json" // what a clean-up needs if the daemon dies: its pid, the pin root
	kubeconfigFile = "kubeconfig" // admin kubeconfig of the lab's apiserver
	labSubdir      = "lab"        // lab.Options.Dir: node dirs, agent logs, control-plane data
	defaultDir     = "/run/tern-lab"
)

// state is written by the daemon before it builds anything, so that `down` can clean up
// after a daemon that was killed half-way.
type state struct {
	PID     int    `json:"pid"`
	PinRoot string `json:"pinRoot"`
	LabDir  string `json:"labDir"`
	// Cgroup is the lab's socket-LB cgroup (parent of the nodes'), recorded once Up made it.
	Cgroup string `json:"cgroup,omitempty"`
}

func readState(dir string) (*state, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return nil, err
	}
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("parse %s: %w", filepath.Join(dir, stateFile), err)
	}
	return &s, nil
}

// Status is GET /v1/status.
type Status struct {
	PID        int        `json:"pid"`
	Dir        string     `json:"dir"`
	Kubeconfig string     `json:"kubeconfig"`
	APIServer  string     `json:"apiServer"`
	PinRoot    string     `json:"pinRoot"`
	Emulator   string     `json:"emulator"`
	Nodes      []NodeInfo `json:"nodes"`
	Pods       []PodInfo  `json:"pods"`
	// External is the lab's client outside the VPC (its own namespace behind the VPC router).
	External ExternalInfo `json:"external"`
}

// ExternalInfo describes the external client.
type ExternalInfo struct {
	IP    string `json:"ip"`
	NetNS string `json:"netns"` // /proc/<daemon>/fd/<n>, for nsenter --net
}

// NodeInfo describes a lab node.
type NodeInfo struct {
	Name       string `json:"name"`
	InstanceID string `json:"instanceID"`
	PrimaryIP  string `json:"primaryIP"`
	AgentPID   int    `json:"agentPID"`
	PinRoot    string `json:"pinRoot"`
	Socket     string `json:"socket"`
	AgentLog   string `json:"agentLog"`
	NetNS      string `json:"netns"` // /proc/<daemon>/fd/<n>, for nsenter --net
	// Cgroup is where the node's agent attached its socket hooks: a process started there in
	// the node's namespace is a host-network process of the node (tern-lab exec does that).
	Cgroup string `json:"cgroup"`
}

// PodInfo describes a lab pod.
type PodInfo struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid"`
	Node      string `json:"node"`
	IP        string `json:"ip"`
	NetNS     string `json:"netns"`
}

// PodRequest is POST /v1/pods.
type PodRequest struct {
	Namespace string            `json:"namespace"`
	Name      string            `json:"name"`
	Node      string            `json:"node,omitempty"` // empty: the node with the fewest pods
	Labels    map[string]string `json:"labels,omitempty"`
	HTTPPort  int               `json:"httpPort,omitempty"`
	ServePort int               `json:"servePort,omitempty"`
}

// AskRequest is POST /v1/ask: Count requests from a pod to Addr (host:port), each on a new
// connection; HTTP GET, or with TCP the greeting protocol of lab.Pod.Serve.
type AskRequest struct {
	Namespace string `json:"namespace"`
	Pod       string `json:"pod"`
	Addr      string `json:"addr"`
	Count     int    `json:"count"`
	TCP       bool   `json:"tcp,omitempty"`
}

// AskResult holds one entry per request: the answer, or the error.
type AskResult struct {
	Answers []string `json:"answers"`
	Errors  []string `json:"errors"`
}

// apiError is the body of every non-2xx answer.
type apiError struct {
	Error string `json:"error"`
}

// client talks to the daemon's control socket.
type client struct {
	dir string
	hc  *http.Client
}

func newClient(dir string, timeout time.Duration) *client {
	sock := filepath.Join(dir, socketFile)
	return &client{dir: dir, hc: &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}},
	}}
}

// errNoDaemon means nothing answers on the control socket.
var errNoDaemon = errors.New("no lab daemon answers")

func (c *client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://lab"+path, body)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return fmt.Errorf("%w on %s (is the lab up? run: tern-lab up -dir %s): %v", errNoDaemon,
				filepath.Join(c.dir, socketFile), c.dir, err)
		}
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s %s: read answer: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		var e apiError
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("%s %s: HTTP %d: %s", method, path, resp.StatusCode, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("%s %s: parse answer: %w", method, path, err)
		}
	}
	return nil
}

func (c *client) status(ctx context.Context) (*Status, error) {
	var s Status
	return &s, c.do(ctx, http.MethodGet, "/v1/status", nil, &s)
}
