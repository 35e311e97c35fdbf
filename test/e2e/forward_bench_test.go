package e2e

import (
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// BenchmarkForward measures what direct forwarding gains between two pods on one node:
// "stack" (every packet through the host stack) and "redirect" (bpf_redirect_peer into the
// peer pod), each on its own node namespace with its own pinned datapath, interleaved in
// rounds in one run so machine noise hits both alike. Per mode:
//
//	rr      one TCP connection, 1-byte request, 1-byte response (a TCP_RR): ns/op is one
//	        round trip
//	stream  one TCP connection writing 64 KiB chunks into a sink: MB/s is goodput
//
// Run: sudo go test ./test/e2e -run '^$' -bench Forward -benchtime 2s
func BenchmarkForward(b *testing.B) {
	type setup struct {
		name   string
		client *podNS
		server *podNS
	}
	var modes []setup
	for _, m := range []struct {
		name string
		fwd  loader.Forwarding
	}{{"stack", loader.ForwardStack}, {"redirect", loader.ForwardRedirect}} {
		lab := newNodeLab(b)
		client := lab.addPod("client", "10.0.1.10")
		server := lab.addPod("server", "10.0.1.21")
		server.serve(b, 8080)
		server.sink(b, 9000)
		d := loadertest.New(b, loader.Config{Forwarding: m.fwd})
		lab.attachAll(d)
		registerPods(b, d, lab, nil)
		modes = append(modes, setup{m.name, client, server})
	}
	const rounds = 3
	for round := 0; round < rounds; round++ {
		for _, m := range modes {
			b.Run(m.name+"/rr", func(b *testing.B) {
				c, _, err := m.client.dialTCP(m.server.ip.String() + ":8080")
				if err != nil {
					b.Fatal(err)
				}
				defer c.c.Close()
				c.c.SetDeadline(time.Time{})
				buf := []byte{'x'}
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if _, err := c.c.Write(buf); err != nil {
						b.Fatal(err)
					}
					if _, err := io.ReadFull(c.r, buf); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run(m.name+"/stream", func(b *testing.B) {
				var conn net.Conn
				err := nsutil.Do(m.client.ns, func() (err error) {
					conn, err = net.Dial("tcp4", m.server.ip.String()+":9000")
					return err
				})
				if err != nil {
					b.Fatal(err)
				}
				defer conn.Close()
				chunk := make([]byte, 64<<10)
				b.SetBytes(int64(len(chunk)))
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if _, err := conn.Write(chunk); err != nil {
						b.Fatal(err)
					}
				}
				// Count only what arrived: the sink closes once it has read everything.
				conn.(*net.TCPConn).CloseWrite()
				if _, err := io.Copy(io.Discard, conn); err != nil {
					b.Fatal(err)
				}
			})
		}
	}
}

// sink accepts TCP connections on port inside the pod and reads them to the end, then
// closes them.
func (p *podNS) sink(tb testing.TB, port int) {
	tb.Helper()
	testutil.ServeConns(tb, p.ns, fmt.Sprintf(":%d", port), func(c net.Conn) {
		io.Copy(io.Discard, c)
		c.Close()
	})
}
