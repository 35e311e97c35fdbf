package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aliyun/alibaba-cloud-sdk-go/services/ecs"

	"github.com/tern-net/tern/test/ecsemu"
)

func TestServeConfigOverLoopback(t *testing.T) {
	for _, k := range []string{"HTTP_PROXY", "http_proxy"} {
		t.Setenv(k, "")
	}
	cfg := ecsemu.TestConfig()
	cfg.VPC.NetNSPath = "/nonexistent/netns" // ignored with -no-sdn
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "emu.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"-config", path, "-listen", "127.0.0.1:0", "-no-sdn"}, pw) }()
	line, err := bufio.NewReader(pr).ReadString('\n')
	if err != nil {
		t.Fatalf("read the listening line: %v", err)
	}
	go func() { _, _ = io.Copy(io.Discard, pr) }()
	addr := strings.TrimSpace(strings.TrimPrefix(line, "listening on "))

	c, _ := ecsemu.NewTestClients(t, addr)
	req := ecs.CreateDescribeInstancesRequest()
	resp, err := c.DescribeInstances(req)
	if err != nil {
		t.Fatalf("DescribeInstances through the binary's server: %v", err)
	}
	if resp.TotalCount != 1 || resp.Instances.Instance[0].InstanceId != "i-test-0001" {
		t.Fatalf("DescribeInstances = %+v", resp.Instances)
	}
	mr, err := http.Get("http://" + addr + "/_emulator/metadata/i-test-0001/latest/meta-data/private-ipv4")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(mr.Body)
	mr.Body.Close()
	if string(body) != "192.168.1.10" {
		t.Fatalf("metadata private-ipv4 = %q", body)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run returned %v after cancel", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return after cancel")
	}
}

func TestRefusesNonLoopback(t *testing.T) {
	err := run(context.Background(), []string{"-config", "x.json", "-listen", "0.0.0.0:8080"}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "not a loopback") {
		t.Fatalf("run with 0.0.0.0 = %v, want a loopback refusal", err)
	}
}
