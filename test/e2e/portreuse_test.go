package e2e

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/lbmap"
)

// A pod closes a ClusterIP connection with a RST (SO_LINGER 0: its port is free at once) and
// connects from the same source port straight to the backend: the direct connection is
// established at once (before the fix its SYN-ACK was reverse-translated to the VIP by the old
// flow's leftover REVNAT half, and the connection timed out). A UDP socket asking the VIP and
// then the backend from one port gets each answer from the address it asked.
func TestDirectConnectionReusesAServiceFlowsPort(t *testing.T) {
	lab := newNodeLab(t)
	client := lab.addPod("client", "10.0.1.10")
	b1 := lab.addPod("b1", "10.0.1.21")
	b1.serve(t, 8080)
	d := loadertest.New(t, loader.Config{PinRoot: loadertest.PinRoot(t)})
	lab.attachAll(d)
	r, err := lbmap.NewReconciler(d.Maps(), nil)
	if err != nil {
		t.Fatal(err)
	}
	web := service.Frontend{Addr: vip, Port: 80, Proto: service.TCP}
	webUDP := service.Frontend{Addr: vip, Port: 80, Proto: service.UDP}
	be := []service.Backend{{Addr: b1.ip, Port: 8080}}
	if err := r.Apply(service.State{web: be, webUDP: be}.Lookup, []service.Frontend{web, webUDP}); err != nil {
		t.Fatal(err)
	}
	backend := netip.AddrPortFrom(b1.ip, 8080)
	const port = 40000

	dialFrom := func(addr string) (*net.TCPConn, error) {
		var c net.Conn
		err := nsutil.Do(client.ns, func() (err error) {
			d := net.Dialer{Timeout: 3 * time.Second, LocalAddr: &net.TCPAddr{IP: client.ip.AsSlice(), Port: port}}
			c, err = d.Dial("tcp4", addr)
			return err
		})
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}
	for i := 0; i < 3; i++ {
		c, err := dialFrom("10.96.0.10:80")
		if err != nil {
			t.Fatalf("round %d: connection through the VIP from port %d: %v", i, port, err)
		}
		if err := greetedEcho(c, "b1"); err != nil {
			t.Fatalf("round %d: through the VIP: %v", i, err)
		}
		if err := c.SetLinger(0); err != nil {
			t.Fatal(err)
		}
		c.Close() // RST
		c, err = dialFrom(backend.String())
		if err != nil {
			t.Fatalf("round %d: direct connection to %s from port %d after the VIP flow's RST: %v", i, backend, port, err)
		}
		if err := greetedEcho(c, "b1"); err != nil {
			t.Fatalf("round %d: direct: %v", i, err)
		}
		if err := c.SetLinger(0); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	t.Logf("3 rounds from port %d: VIP connection closed with RST, then a direct connection to %s, both answered at once", port, backend)

	var u *net.UDPConn
	err = nsutil.Do(client.ns, func() (err error) {
		u, err = net.ListenUDP("udp4", &net.UDPAddr{IP: client.ip.AsSlice(), Port: port})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	ask := func(to netip.AddrPort) netip.AddrPort {
		t.Helper()
		if _, err := u.WriteToUDPAddrPort([]byte("who"), to); err != nil {
			t.Fatal(err)
		}
		u.SetReadDeadline(time.Now().Add(3 * time.Second))
		buf := make([]byte, 1500)
		_, from, err := u.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("UDP to %s from port %d: %v", to, port, err)
		}
		return from
	}
	front := netip.AddrPortFrom(vip, 80)
	for _, to := range []netip.AddrPort{front, backend, front, backend} {
		if from := ask(to); from != to {
			t.Fatalf("UDP asked %s from port %d, the answer came from %s", to, port, from)
		}
	}
	t.Logf("one UDP socket on port %d asked the VIP and %s in turn: each answer came from the address asked", port, backend)
}

// greetedEcho reads c's greeting, wants it from who, and echoes one line.
func greetedEcho(c net.Conn, who string) error {
	cc := &conn{c: c, r: bufio.NewReader(c)}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	greet, err := cc.r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("read greeting: %w", err)
	}
	if got := strings.TrimSpace(greet); got != who {
		return fmt.Errorf("greeted by %q, want %q", got, who)
	}
	return cc.echo("ping")
}
