package e2e

import (
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/sockclient"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/lbmap"
)

// BenchmarkSocketLBConnect measures connect()+close() from a pod to a ClusterIP with two
// backends, three ways: through the socket hooks (the client's cgroup has them), through
// the tc path (a client outside that cgroup: per-packet DNAT on the veth), and straight to
// a backend's address (no Service: the baseline). The pod's tc programs are attached in
// all three. Run it short: make bench-socklb.
func BenchmarkSocketLBConnect(b *testing.B) {
	lab := newNodeLab(b)
	client := lab.addPod("client", "10.0.1.10")
	b1 := lab.addPod("b1", "10.0.1.21")
	b2 := lab.addPod("b2", "10.0.1.22")
	b1.serveSink(b, 8080)
	b2.serveSink(b, 8080)
	d := loadertest.New(b, loader.Config{})
	lab.attachAll(d)
	sock, err := d.LoadSock()
	if err != nil {
		b.Fatal(err)
	}
	defer sock.Close()
	in, out := newTestCgroups(b)
	if err := sock.Attach(in); err != nil {
		b.Fatal(err)
	}
	r, err := lbmap.NewReconciler(d.Maps(), nil)
	if err != nil {
		b.Fatal(err)
	}
	web := service.Frontend{Addr: vip, Port: 80, Proto: service.TCP}
	desired := service.State{web: {{Addr: b1.ip, Port: 8080}, {Addr: b2.ip, Port: 8080}}}
	if err := r.Apply(desired.Lookup, []service.Frontend{web}); err != nil {
		b.Fatal(err)
	}
	cin := sockclient.Start(b, client.ns, in)
	cout := sockclient.Start(b, client.ns, out)
	for _, c := range []struct {
		name string
		cl   *sockclient.Client
		addr string
	}{
		// direct first: a plain flow reusing the wire tuple of a tc-path service flow that
		// is still in tern_conntrack (closing) has its replies reverse-translated to the
		// VIP and stalls on a SYN retransmit (docs/socket-lb.md, known limits).
		{"direct", cout, "10.0.1.21:8080"}, // to one backend's address: no Service at all
		{"socket-lb", cin, "10.96.0.10:80"},
		{"tc-path", cout, "10.96.0.10:80"},
	} {
		b.Run(c.name, func(b *testing.B) {
			a := c.cl.OK(fmt.Sprintf("connloop %s %d", c.addr, b.N))
			b.ReportMetric(float64(b.N)/(time.Duration(a.Nanos).Seconds()), "connects/s")
			b.ReportMetric(float64(a.Nanos)/float64(b.N), "ns/connect")
		})
	}
}

// serveSink accepts TCP connections and closes each once the client has: the client closes
// first (with RST), so no TIME_WAIT is left on either side to collide with a reused port.
func (p *podNS) serveSink(b testing.TB, port int) {
	b.Helper()
	var l net.Listener
	err := nsutil.Do(p.ns, func() (err error) {
		l, err = net.Listen("tcp4", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	b.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); io.Copy(io.Discard, c); c.Close() }()
		}
	}()
}
