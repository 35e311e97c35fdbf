// Package metadata reads the ECS instance metadata service (100.100.100.200 on every
// instance), where a node learns who it is without configuration: its instance ID and region.
package metadata

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// DefaultEndpoint is the metadata service of every ECS instance.
const DefaultEndpoint = "http://100.100.100.200"

// Client reads metadata items.
type Client struct {
	endpoint string
	http     *http.Client
}

// New makes a client for endpoint (DefaultEndpoint when empty). The metadata service is
// link-local: requests never go through a proxy.
func New(endpoint string) *Client {
	if endpoint == "" {
		endpoint = DefaultEndpoint
	}
	return &Client{endpoint: strings.TrimRight(endpoint, "/"),
		http: &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: nil}}}
}

// Get returns one item under latest/meta-data/, e.g. "instance-id" or "region-id". It
// retries for up to wait: right after boot or an attach the service can lag.
func (c *Client) Get(ctx context.Context, item string, wait time.Duration) (string, error) {
	url := c.endpoint + "/latest/meta-data/" + item
	deadline := time.Now().Add(wait)
	delay := 100 * time.Millisecond
	for {
		v, err := c.get(ctx, url)
		if err == nil {
			return v, nil
		}
		if time.Now().Add(delay).After(deadline) {
			return "", fmt.Errorf("read %s from the instance metadata service (%s): %w; set it in the agent config instead", item, url, err)
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("read %s from the instance metadata service (%s): %w (last error: %v)", item, url, ctx.Err(), err)
		case <-time.After(delay):
		}
		delay = min(2*delay, 2*time.Second)
	}
}

func (c *Client) get(ctx context.Context, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(b)))
	}
	v := strings.TrimSpace(string(b))
	if v == "" {
		return "", fmt.Errorf("empty answer")
	}
	return v, nil
}
