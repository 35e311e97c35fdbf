package nsbridge_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/test/k8s/nsbridge"
)

// startReverser serves on root-namespace loopback: it reads until the client half-closes,
// then answers with the reversed bytes and the peer address it saw, and closes.
func startReverser(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				data, err := io.ReadAll(c)
				if err != nil {
					return
				}
				r := []byte(string(data))
				for i, j := 0, len(r)-1; i < j; i, j = i+1, j-1 {
					r[i], r[j] = r[j], r[i]
				}
				fmt.Fprintf(c, "%s|%s", r, c.RemoteAddr())
			}()
		}
	}()
	return ln
}

// exchangeInNS dials addr from inside ns, sends msg, half-closes and returns the answer.
func exchangeInNS(ns netns.NsHandle, addr, msg string) (string, error) {
	var answer string
	err := nsutil.Do(ns, func() error {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, msg); err != nil {
			return err
		}
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			return err
		}
		b, err := io.ReadAll(c)
		answer = string(b)
		return err
	})
	return answer, err
}

func TestBridgeReachesRootLoopbackFromNamespace(t *testing.T) {
	testutil.RequirePrivileged(t)
	target := startReverser(t)
	addr := target.Addr().String()
	ns := testutil.NewNetNS(t)

	// Before the bridge the namespace has no such service: its loopback is its own.
	if _, err := exchangeInNS(ns, addr, "x"); err == nil {
		t.Fatalf("dial %s inside a fresh namespace succeeded before any bridge; the test is not isolating namespaces", addr)
	}

	// The listener must be in the namespace, not in the root namespace: the root
	// namespace's 127.0.0.1:<port> is the target itself, and a second listener there
	// would fail with EADDRINUSE at Start.
	b, err := nsbridge.Start(nsbridge.Config{NS: ns, Target: addr})
	if err != nil {
		t.Fatal(err)
	}
	if got := b.Addr().String(); got != addr {
		t.Fatalf("bridge listens on %s, want the target's own address %s", got, addr)
	}

	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := strings.Repeat(fmt.Sprintf("conn%d-", i), 20000) // > socket buffers
			got, err := exchangeInNS(ns, addr, msg)
			if err != nil {
				errs <- fmt.Errorf("conn %d: %w", i, err)
				return
			}
			rev, peer, ok := strings.Cut(got, "|")
			if !ok || len(rev) != len(msg) || rev[len(rev)-1] != msg[0] || rev[0] != msg[len(msg)-1] {
				errs <- fmt.Errorf("conn %d: answer of %d bytes is not the reversed message of %d bytes", i, len(got), len(msg))
				return
			}
			// The target sees the bridge's root-namespace socket, on loopback.
			if !strings.HasPrefix(peer, "127.0.0.1:") {
				errs <- fmt.Errorf("conn %d: target saw peer %q, want a 127.0.0.1 address", i, peer)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	if err := b.Close(); err != nil {
		t.Fatalf("close bridge: %v", err)
	}
	_, err = exchangeInNS(ns, addr, "after close")
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial inside the namespace after Close: got %v, want connection refused", err)
	}
	// The target itself is untouched by closing the bridge.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("target in the root namespace gone after bridge Close: %v", err)
	}
	c.Close()
}

func TestBridgeCloseCutsOpenConnections(t *testing.T) {
	testutil.RequirePrivileged(t)
	// A target that accepts and never answers: the connection stays open until cut.
	target, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := target.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	ns := testutil.NewNetNS(t)
	b, err := nsbridge.Start(nsbridge.Config{NS: ns, Target: target.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	var client net.Conn
	if err := nsutil.Do(ns, func() error {
		client, err = net.DialTimeout("tcp", target.Addr().String(), 2*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	var server net.Conn
	select {
	case server = <-accepted:
		defer server.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("target never saw the bridged connection")
	}

	closed := make(chan error, 1)
	go func() { closed <- b.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close blocked on an open proxied connection")
	}
	// Both ends observe the cut.
	_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := client.Read(make([]byte, 1)); err == nil {
		t.Fatal("client read data after Close, want EOF or reset")
	} else if errors.Is(err, syscall.ETIMEDOUT) || strings.Contains(err.Error(), "timeout") {
		t.Fatalf("client connection still open after Close: %v", err)
	}
	_ = server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := server.Read(make([]byte, 1)); err == nil || strings.Contains(err.Error(), "timeout") {
		t.Fatalf("target connection still open after Close: %v", err)
	}
}

func TestStartRejectsBadTarget(t *testing.T) {
	testutil.RequirePrivileged(t)
	ns := testutil.NewNetNS(t)
	_, err := nsbridge.Start(nsbridge.Config{NS: ns, Target: "127.0.0.1"})
	if err == nil || !strings.Contains(err.Error(), "want host:port") {
		t.Fatalf("Start with a target without port: got %v, want a host:port error", err)
	}
}
