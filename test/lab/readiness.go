//go:build linux

package lab

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/test/k8s/nsbridge"
)

// AgentConfDir is the CNI configuration directory the agent installs its conflist into once
// the node is ready (agent.Config.CNIConfDir). It is not ConfDir, which the lab fills
// itself before any agent runs so that libcni can call the plugin from the start.
func (n *Node) AgentConfDir() string { return filepath.Join(n.dir, "agent-net.d") }

// Readyz asks the node's agent for /readyz (verbose when verbose is set) on its metrics
// address inside the node namespace and returns the status code and body. Kubernetes labs
// only: other labs serve no metrics address.
func (n *Node) Readyz(ctx context.Context, verbose bool) (int, string, error) {
	addr := n.metricsAddr()
	if addr == "" {
		return 0, "", fmt.Errorf("lab: the agent of %s serves /readyz only in a Kubernetes lab", n.Name)
	}
	tr := &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			var c net.Conn
			err := nsutil.Do(n.NS, func() error {
				var d net.Dialer
				var err error
				c, err = d.DialContext(ctx, "tcp4", addr)
				return err
			})
			return c, err
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	url := "http://" + addr + "/readyz"
	if verbose {
		url += "?verbose"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return 0, "", fmt.Errorf("lab: GET %s in %s: %w", url, n.Name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return 0, "", fmt.Errorf("lab: GET %s in %s: read body: %w", url, n.Name, err)
	}
	return resp.StatusCode, strings.TrimRight(string(b), "\n"), nil
}

// SetAPIServerReachable cuts (false) or restores (true) the node's path to the apiserver:
// its bridge stops listening and drops every connection, so the agent's list and watch calls
// get "connection refused" as on a node whose control-plane route is down. Kubernetes labs
// only.
func (n *Node) SetAPIServerReachable(reachable bool) error {
	k := n.lab.kube
	if k == nil || k.cp == nil {
		return fmt.Errorf("lab: %s has no apiserver to cut (not a Kubernetes lab)", n.Name)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	switch {
	case !reachable && n.apiBridge != nil:
		err := n.apiBridge.Close()
		n.apiBridge = nil
		if err != nil {
			return fmt.Errorf("lab: close the apiserver bridge of %s: %w", n.Name, err)
		}
	case reachable && n.apiBridge == nil:
		target := strings.TrimPrefix(k.cp.APIServerURL(), "https://")
		b, err := nsbridge.Start(nsbridge.Config{NS: n.NS, Target: target, Logger: n.lab.log.Named("nsbridge")})
		if err != nil {
			return fmt.Errorf("lab: bridge the apiserver into %s again: %w", n.Name, err)
		}
		n.apiBridge = b
	}
	return nil
}
