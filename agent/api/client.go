package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"
	"time"
)

// Client talks to the agent over its unix socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client of the agent listening on socket. timeout bounds each request
// (0: 30 s, longer than the agent's own allocation wait).
func NewClient(socket string, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			// EAGAIN means the agent's accept queue is full (a burst, or a client flooding the
			// socket): the agent drains it quickly, so wait for room rather than fail the call.
			var d net.Dialer
			for {
				c, err := d.DialContext(ctx, "unix", socket)
				if err == nil || !errors.Is(err, syscall.EAGAIN) {
					return c, err
				}
				select {
				case <-ctx.Done():
					return nil, fmt.Errorf("%w (the agent's accept queue stayed full)", err)
				case <-time.After(5 * time.Millisecond):
				}
			}
		},
		DisableKeepAlives: true,
	}
	return &Client{socket: socket, http: &http.Client{Transport: tr, Timeout: timeout}}
}

// Allocate asks for an address for a sandbox (idempotent per sandbox).
func (c *Client) Allocate(ctx context.Context, r AllocateRequest) (Allocation, error) {
	var out Allocation
	return out, c.do(ctx, http.MethodPost, PathAllocate, r, &out)
}

// Lookup returns the sandbox's allocation, if any.
func (c *Client) Lookup(ctx context.Context, r PodRef) (LookupResponse, error) {
	var out LookupResponse
	return out, c.do(ctx, http.MethodPost, PathLookup, r, &out)
}

// Policy returns what NetworkPolicy does to a pod (r's namespace and name).
func (c *Client) Policy(ctx context.Context, r PodRef) (PolicyView, error) {
	var out PolicyView
	return out, c.do(ctx, http.MethodPost, PathPolicy, r, &out)
}

// Release returns the sandbox's address to the pool (idempotent).
func (c *Client) Release(ctx context.Context, r PodRef) (ReleaseResponse, error) {
	var out ReleaseResponse
	return out, c.do(ctx, http.MethodPost, PathRelease, r, &out)
}

// Attach asks the agent to attach the pod programs to a host veth.
func (c *Client) Attach(ctx context.Context, r AttachRequest) (AttachResponse, error) {
	var out AttachResponse
	return out, c.do(ctx, http.MethodPost, PathAttach, r, &out)
}

// Detach asks the agent to remove the pod programs (and their pins) from a host veth.
func (c *Client) Detach(ctx context.Context, r AttachRequest) error {
	var out struct{}
	return c.do(ctx, http.MethodPost, PathDetach, r, &out)
}

// GC releases every allocation whose attachment is not listed.
func (c *Client) GC(ctx context.Context, r GCRequest) (GCResponse, error) {
	var out GCResponse
	return out, c.do(ctx, http.MethodPost, PathGC, r, &out)
}

// Status returns the agent's readiness.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var out Status
	return out, c.do(ctx, http.MethodGet, PathStatus, nil, &out)
}

// State returns the pool and its allocations.
func (c *Client) State(ctx context.Context) (State, error) {
	var out State
	return out, c.do(ctx, http.MethodGet, PathState, nil, &out)
}

// Readiness returns every readiness component of the agent.
func (c *Client) Readiness(ctx context.Context) (Readiness, error) {
	var out Readiness
	return out, c.do(ctx, http.MethodGet, PathReady, nil, &out)
}

// Readyz asks the agent's /readyz on the socket: whether the probe the kubelet runs would
// pass (HTTP 200), with its body.
func (c *Client) Readyz(ctx context.Context) (bool, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent"+PathReadyz+"?verbose", nil)
	if err != nil {
		return false, "", err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return false, "", c.unreachable(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode == http.StatusOK, string(b), err
}

// Metrics returns the agent's metrics in the Prometheus text format.
func (c *Client) Metrics(ctx context.Context) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent"+PathMetrics, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return "", c.unreachable(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// unreachable turns a transport failure into a try-again error: the agent may be restarting,
// and the runtime retries a failed sandbox anyway.
func (c *Client) unreachable(err error) error {
	return &Error{Code: CodeTryAgainLater, Msg: fmt.Sprintf("tern-agent not reachable on %s; try again once it runs", c.socket), Details: err.Error()}
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encode %s request: %w", path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://agent"+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return c.unreachable(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return c.unreachable(err)
	}
	if resp.StatusCode != http.StatusOK {
		var e Error
		if jerr := json.Unmarshal(b, &e); jerr != nil || e.Code == 0 {
			return &Error{Code: CodeInternal, Msg: fmt.Sprintf("tern-agent %s: HTTP %d", path, resp.StatusCode), Details: string(b)}
		}
		return &e
	}
	if err := json.Unmarshal(b, out); err != nil {
		return &Error{Code: CodeDecodeFailure, Msg: fmt.Sprintf("decode tern-agent %s reply", path), Details: err.Error()}
	}
	return nil
}

// AsError returns err as an *Error, wrapping foreign errors with code.
func AsError(err error, code uint) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return &Error{Code: code, Msg: err.Error()}
}
