package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/lbmap"
)

// TestICMPErrorsOfServiceFlowsReachTheClient: ICMP errors about a service flow's
// translated packets reach the client's socket, which is connected to the frontend
// (tern_to_pod turns them back, bpf/lib/svcicmp.h), on the tc path alone (no socket LB):
//   - a UDP Service whose backend has no socket on the target port: the backend's kernel
//     answers port unreachable, and the client's connected socket gets ECONNREFUSED at once
//     (as through kube-proxy), not a timeout;
//   - a TCP Service whose backend sits beyond a hop with a smaller MTU (its host veth, 1400,
//     while both pods advertise an MSS for 1500): the node forwards through the stack and
//     answers the client's full-size segments with fragmentation needed; a bulk write
//     through the Service completes only if the client's TCP hears it (path MTU discovery;
//     untranslated, the segments are retransmitted at full size until the deadline).
func TestICMPErrorsOfServiceFlowsReachTheClient(t *testing.T) {
	lab := newNodeLab(t)
	client := lab.addPod("client", "10.0.1.10")
	deaf := lab.addPod("deaf", "10.0.1.21")
	far := lab.addPod("far", "10.0.1.23")
	const bulk = 256 << 10
	sinkIn(t, far, ":9000", bulk)
	err := nsutil.Do(lab.node, func() error {
		lk, err := netlink.LinkByName(far.hostIf)
		if err != nil {
			return err
		}
		return netlink.LinkSetMTU(lk, 1400)
	})
	if err != nil {
		t.Fatal(err)
	}

	d := loadertest.New(t, loader.Config{PinRoot: loadertest.PinRoot(t), Forwarding: loader.ForwardStack})
	lab.attachAll(d)
	registerPods(t, d, lab, nil)
	r, err := lbmap.NewReconciler(d.Maps(), nil)
	if err != nil {
		t.Fatal(err)
	}
	udpDeaf := service.Frontend{Addr: vip, Port: 82, Proto: service.UDP}
	tcpFar := service.Frontend{Addr: vip, Port: 83, Proto: service.TCP}
	desired := service.State{
		udpDeaf: {{Addr: deaf.ip, Port: 5999}}, // nothing listens there
		tcpFar:  {{Addr: far.ip, Port: 9000}},
	}
	if err := r.Apply(desired.Lookup, []service.Frontend{udpDeaf, tcpFar}); err != nil {
		t.Fatal(err)
	}
	counted := func() uint64 { return loadertest.Metric(t, d.Maps(), loader.ReasonSvcICMPError, loader.DirToPod) }

	start := time.Now()
	if _, _, err := client.udpAsk("10.96.0.10:82"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("UDP through a Service to a backend port nobody listens on: %v, want ECONNREFUSED (the backend's port unreachable)", err)
	}
	t.Logf("UDP to a deaf backend through 10.96.0.10:82: refused after %v", time.Since(start).Round(time.Millisecond))
	if n := counted(); n < 1 {
		t.Fatalf("svc_icmp_error counted %d after the port unreachable, want at least 1", n)
	}

	before := counted()
	start = time.Now()
	got, err := bulkThrough(client, "10.96.0.10:83", bulk, 10*time.Second)
	if err != nil {
		t.Fatalf("%d bytes through the Service to a backend beyond a 1400-byte hop: %v (path MTU discovery needs the fragmentation-needed errors turned back to the frontend)", bulk, err)
	}
	if want := fmt.Sprintf("got %d", bulk); got != want {
		t.Fatalf("the backend answered %q, want %q", got, want)
	}
	if n := counted() - before; n < 1 {
		t.Fatalf("svc_icmp_error counted %d during the bulk write, want the node's fragmentation needed (the hop's MTU was not in the way?)", n)
	}
	t.Logf("%d KiB through 10.96.0.10:83 beyond a 1400-byte hop in %v; ICMP errors turned back: %d", bulk>>10,
		time.Since(start).Round(time.Millisecond), counted()-before)
}

// sinkIn serves TCP on addr inside p: each connection's first n bytes are read, then
// answered with "got <n>" on a line. The answer is small on purpose: p's host veth may have
// a smaller MTU, which drops large packets from p (veth does not fragment).
func sinkIn(t *testing.T, p *podNS, addr string, n int) {
	t.Helper()
	testutil.ServeConns(t, p.ns, addr, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(30 * time.Second))
		got, _ := io.CopyN(io.Discard, c, int64(n))
		fmt.Fprintf(c, "got %d\n", got)
		c.Close()
	})
}

// bulkThrough connects from p to addr, writes n bytes and returns the answer line.
func bulkThrough(p *podNS, addr string, n int, within time.Duration) (string, error) {
	c, err := p.dial(addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(within))
	if _, err := c.Write(bytes.Repeat([]byte{'x'}, n)); err != nil {
		return "", fmt.Errorf("write: %w", err)
	}
	line, err := io.ReadAll(c)
	if err != nil {
		return "", fmt.Errorf("read the answer: %w", err)
	}
	return strings.TrimSpace(string(line)), nil
}
