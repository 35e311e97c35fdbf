package testutil

import (
	"net"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/tern-net/tern/internal/nsutil"
)

// ServeConns listens for TCP on addr inside ns and hands each accepted connection to handle,
// one after the other (handle closes it). The listener is closed, and its goroutine waited
// for, when the test ends.
func ServeConns(tb testing.TB, ns netns.NsHandle, addr string, handle func(net.Conn)) {
	tb.Helper()
	var l net.Listener
	err := nsutil.Do(ns, func() (err error) {
		l, err = net.Listen("tcp4", addr)
		return err
	})
	if err != nil {
		tb.Fatal(err)
	}
	done := make(chan struct{})
	tb.Cleanup(func() { l.Close(); <-done })
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			handle(c)
		}
	}()
}
