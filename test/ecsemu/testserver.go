package ecsemu

import (
	"net/http/httptest"
	"testing"

	"github.com/aliyun/alibaba-cloud-sdk-go/sdk"
	"github.com/aliyun/alibaba-cloud-sdk-go/sdk/auth/credentials"
	"github.com/aliyun/alibaba-cloud-sdk-go/services/ecs"
	"github.com/aliyun/alibaba-cloud-sdk-go/services/vpc"
)

// NewTestServer starts an emulator for cfg behind an HTTP server on 127.0.0.1 and returns it
// with the server's host:port. Both are closed when the test ends. It clears HTTP_PROXY and
// friends for the test, since the SDK would otherwise send loopback calls to a proxy.
func NewTestServer(tb testing.TB, cfg *Config, opts ...Option) (*Emulator, string) {
	tb.Helper()
	for _, k := range []string{"HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"} {
		tb.Setenv(k, "")
	}
	e, err := New(cfg, opts...)
	if err != nil {
		tb.Fatalf("start ECS emulator: %v", err)
	}
	srv := httptest.NewServer(e.Handler())
	tb.Cleanup(func() {
		srv.Close()
		if err := e.Close(); err != nil {
			tb.Errorf("close ECS emulator: %v", err)
		}
	})
	return e, srv.Listener.Addr().String()
}

// NewClients returns real SDK clients (ECS and VPC) that talk plain HTTP to the emulator at
// hostPort with the given access key.
func NewClients(region, hostPort, keyID, secret string) (*ecs.Client, *vpc.Client, error) {
	cred := credentials.NewAccessKeyCredential(keyID, secret)
	ec, err := ecs.NewClientWithOptions(region, sdk.NewConfig().WithScheme("HTTP"), cred)
	if err != nil {
		return nil, nil, err
	}
	ec.Domain = hostPort
	vc, err := vpc.NewClientWithOptions(region, sdk.NewConfig().WithScheme("HTTP"), cred)
	if err != nil {
		return nil, nil, err
	}
	vc.Domain = hostPort
	return ec, vc, nil
}

// NewTestClients is NewClients with TestConfig's region and credentials; it fails the test on
// error.
func NewTestClients(tb testing.TB, hostPort string) (*ecs.Client, *vpc.Client) {
	tb.Helper()
	ec, vc, err := NewClients(TestRegion, hostPort, TestAccessKeyID, TestAccessKeySecret)
	if err != nil {
		tb.Fatalf("build SDK clients for %s: %v", hostPort, err)
	}
	return ec, vc
}
