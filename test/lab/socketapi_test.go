//go:build linux

package lab_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/test/lab"
)

const (
	floodEnv      = "TERN_LAB_FLOOD_SOCKET"
	floodCountEnv = "TERN_LAB_FLOOD_COUNT"
)

// floodHelper, run by TestMain in a child process, opens count connections to socket, sends
// each the headers and half of the body of a request, reports, and holds them until its
// stdin closes.
func floodHelper(socket string, count int) {
	req := "POST " + api.PathAllocate + " HTTP/1.1\r\nHost: agent\r\nContent-Length: 1000\r\n\r\n{\"namespace\":\"default\","
	var (
		mu     sync.Mutex
		open   []net.Conn
		failed int
		wg     sync.WaitGroup
	)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < count; i += 8 {
				// A full accept queue (EAGAIN) is retried for a while, so nearly every one of
				// the count connections reaches the agent.
				var c net.Conn
				var err error
				for deadline := time.Now().Add(10 * time.Second); ; {
					c, err = net.DialTimeout("unix", socket, time.Second)
					if err == nil || !errors.Is(err, syscall.EAGAIN) || time.Now().After(deadline) {
						break
					}
					time.Sleep(time.Millisecond)
				}
				if err == nil {
					_, err = io.WriteString(c, req)
				}
				mu.Lock()
				if err != nil {
					failed++
					if c != nil {
						c.Close()
					}
				} else {
					open = append(open, c)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	fmt.Printf("opened %d failed %d\n", len(open), failed)
	_, _ = io.Copy(io.Discard, os.Stdin)
	for _, c := range open {
		c.Close()
	}
}

// procStatus reads one kB field (VmRSS, …) of a process.
func procStatus(t *testing.T, pid int, field string) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			v, err := strconv.Atoi(strings.Fields(rest)[0])
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

func openFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// rawPost sends a request with a body of size bytes (chunked when chunked) and returns the
// agent's answer. The body is streamed, so the test itself never holds it.
func rawPost(t *testing.T, socket, path string, size int64, chunked bool) (*http.Response, []byte) {
	t.Helper()
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	hdr := "POST " + path + " HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
	if chunked {
		hdr += "Transfer-Encoding: chunked\r\n\r\n"
	} else {
		hdr += fmt.Sprintf("Content-Length: %d\r\n\r\n", size)
	}
	go func() {
		// Write errors are expected: the agent stops reading and closes.
		if _, err := io.WriteString(c, hdr+maybeChunk(chunked, `{"namespace":"`)); err != nil {
			return
		}
		chunk := bytes.Repeat([]byte("a"), 1<<20)
		for sent := int64(0); sent < size; sent += int64(len(chunk)) {
			if _, err := io.WriteString(c, maybeChunk(chunked, string(chunk))); err != nil {
				return
			}
		}
	}()
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("read the agent's answer to a %d-byte body: %v", size, err)
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	return resp, b
}

func maybeChunk(chunked bool, s string) string {
	if !chunked {
		return s
	}
	return fmt.Sprintf("%x\r\n%s\r\n", len(s), s)
}

// TestSocketAPIUnderAbuse: the agent's socket refuses huge bodies without taking the memory,
// refuses to attach to anything but a pod veth, and keeps serving CNI calls while a client
// holds 20,000 half-sent requests.
func TestSocketAPIUnderAbuse(t *testing.T) {
	l := up(t, lab.Options{Nodes: 1, ENIConf: lab.ENIConf{MinPoolSize: 2, MaxPoolSize: 6}})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	n := l.Node(0)
	pid := n.AgentPID()
	first := addPods(t, l, ctx, 0, 1)

	t.Run("200 MB body", func(t *testing.T) {
		// Bound: the agent never holds more than one capped body (1 MiB) per request; 64 MB
		// leaves room for the Go runtime's own growth.
		const maxGrowthKB = 64 << 10
		before := procStatus(t, pid, "VmRSS")
		for _, chunked := range []bool{false, true} {
			resp, body := rawPost(t, n.Socket(), api.PathAllocate, 200<<20, chunked)
			if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "exceeds the limit of 1048576 bytes") {
				t.Fatalf("chunked=%v: HTTP %d %s, want 400 naming the limit", chunked, resp.StatusCode, body)
			}
		}
		after := procStatus(t, pid, "VmRSS")
		hwm := procStatus(t, pid, "VmHWM")
		t.Logf("agent RSS %d kB before, %d kB after, peak %d kB", before, after, hwm)
		if after-before > maxGrowthKB || hwm-before > maxGrowthKB {
			t.Fatalf("a 200 MB body grew the agent from %d kB to %d kB (peak %d kB); bound is +%d kB", before, after, hwm, maxGrowthKB)
		}
	})

	t.Run("attach and detach take only pod veths", func(t *testing.T) {
		c := n.Client()
		for _, tc := range []struct {
			call func() error
			want string
		}{
			{func() error { _, err := c.Attach(ctx, api.AttachRequest{IfIndex: 1}); return err }, "ifIndex 1 is lo (type device), not a pod's host veth"},
			{func() error { _, err := c.Attach(ctx, api.AttachRequest{IfIndex: -5}); return err }, "ifIndex -5 is not a valid interface index"},
			{func() error { _, err := c.Attach(ctx, api.AttachRequest{IfIndex: 1 << 30}); return err }, "no such interface"},
			{func() error { return c.Detach(ctx, api.AttachRequest{IfIndex: -5}) }, "ifIndex -5 is not a valid interface index"},
		} {
			err := tc.call()
			if e := api.AsError(err, 0); err == nil || e.Code != api.CodeInvalidConfig || !strings.Contains(e.Msg, tc.want) {
				t.Errorf("got %v, want code %d containing %q", err, api.CodeInvalidConfig, tc.want)
			}
		}
	})

	t.Run("20000 half-open connections", func(t *testing.T) {
		// Two flood processes of 10,000 connections each: a process may hold only as many
		// descriptors as RLIMIT_NOFILE allows, and this one may not raise it.
		var opened int
		for range 2 {
			cmd := exec.Command(os.Args[0])
			cmd.Env = append(os.Environ(), floodEnv+"="+n.Socket(), floodCountEnv+"=10000")
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// Closing stdin ends the helper, which closes its connections.
			t.Cleanup(func() { stdin.Close(); _ = cmd.Wait() })
			var ok, failed int
			if _, err := fmt.Fscanf(out, "opened %d failed %d\n", &ok, &failed); err != nil {
				t.Fatalf("flood helper: %v", err)
			}
			t.Logf("flood helper: %d connections opened and left half-sent, %d refused", ok, failed)
			opened += ok
		}
		if opened < 19000 {
			t.Fatalf("only %d flood connections opened; the test would prove nothing", opened)
		}
		if fds := openFDs(t, pid); fds > agent.MaxSocketConns+200 {
			t.Errorf("the agent holds %d descriptors under the flood; the cap is %d connections", fds, agent.MaxSocketConns)
		}
		// A real CNI ADD, with the plugin's default 30 s timeout, must succeed at once.
		start := time.Now()
		addCtx, addCancel := context.WithTimeout(ctx, 30*time.Second)
		defer addCancel()
		p, err := l.AddPod(addCtx, 0, "default", "during-flood")
		if err != nil {
			t.Fatalf("ADD during the flood: %v", err)
		}
		if p.Attempts != 1 {
			t.Errorf("ADD during the flood took %d attempts; want the first to succeed", p.Attempts)
		}
		t.Logf("ADD during the flood took %v", time.Since(start))
		if err := n.Status(ctx); err != nil {
			t.Errorf("CNI STATUS during the flood: %v", err)
		}
		intact(t, l, ctx, n, append(first, p), "the flood")
	})
}
