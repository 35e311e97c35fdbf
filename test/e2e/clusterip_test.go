// Package e2e runs tern's datapath end to end in network namespaces: a node namespace
// (never the root namespace) with pod namespaces behind veths, real TCP and UDP sockets.
package e2e

import (
	"errors"
	"net/netip"
	"syscall"
	"testing"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/lbmap"
)

var (
	vip      = netip.MustParseAddr("10.96.0.10")
	emptyVIP = netip.MustParseAddr("10.96.0.11")
)

func TestClusterIPEndToEnd(t *testing.T) {
	for _, mode := range []struct {
		name   string
		clsact bool
	}{{"auto", false}, {"clsact", true}} { // auto: tcx where the kernel has it, else clsact
		t.Run(mode.name, func(t *testing.T) { testClusterIP(t, mode.clsact) })
	}
}

func testClusterIP(t *testing.T, forceClsact bool) {
	lab := newNodeLab(t)
	client := lab.addPod("client", "10.0.1.10")
	b1 := lab.addPod("b1", "10.0.1.21")
	b2 := lab.addPod("b2", "10.0.1.22")
	b1.serve(t, 8080)
	b2.serve(t, 8080)
	client.serve(t, 8080)

	cfg := loader.Config{PinRoot: loadertest.PinRoot(t), ForceClsact: forceClsact}
	d := loadertest.New(t, cfg)
	lab.attachAll(d)
	r, err := lbmap.NewReconciler(d.Maps(), nil)
	if err != nil {
		t.Fatal(err)
	}
	web := service.Frontend{Addr: vip, Port: 80, Proto: service.TCP}
	webUDP := service.Frontend{Addr: vip, Port: 80, Proto: service.UDP}
	self := service.Frontend{Addr: vip, Port: 81, Proto: service.TCP}
	empty := service.Frontend{Addr: emptyVIP, Port: 80, Proto: service.TCP}
	emptyUDP := service.Frontend{Addr: emptyVIP, Port: 53, Proto: service.UDP}
	both := []service.Backend{{Addr: b1.ip, Port: 8080}, {Addr: b2.ip, Port: 8080}}
	desired := service.State{web: both, webUDP: both, empty: {}, emptyUDP: {},
		self: {{Addr: client.ip, Port: 8080}}}
	if err := r.Apply(desired.Lookup, []service.Frontend{web, webUDP, self, empty, emptyUDP}); err != nil {
		t.Fatal(err)
	}

	// TCP through the VIP spreads over both backends; the socket is connected to the VIP,
	// so every byte that arrives proves reverse NAT.
	seen := map[string]int{}
	for i := 0; i < 30; i++ {
		c, who, err := client.dialTCP("10.96.0.10:80")
		if err != nil {
			t.Fatalf("connection %d through the VIP: %v", i, err)
		}
		if err := c.echo("ping"); err != nil {
			t.Fatal(err)
		}
		c.c.Close()
		seen[who]++
	}
	if seen["b1"] == 0 || seen["b2"] == 0 || seen["b1"]+seen["b2"] != 30 {
		t.Fatalf("TCP load did not spread over both backends: %v", seen)
	}
	t.Logf("30 TCP connections from pod client to 10.96.0.10:80 were answered by: b1 %d, b2 %d", seen["b1"], seen["b2"])

	// UDP answers come from the VIP.
	udpSeen := map[string]int{}
	for i := 0; i < 20; i++ {
		who, from, err := client.udpAsk("10.96.0.10:80")
		if err != nil {
			t.Fatal(err)
		}
		if from != netip.AddrPortFrom(vip, 80) {
			t.Fatalf("UDP answer from %s, want the VIP", from)
		}
		udpSeen[who]++
	}
	if udpSeen["b1"] == 0 || udpSeen["b2"] == 0 {
		t.Fatalf("UDP load did not spread: %v", udpSeen)
	}
	t.Logf("20 UDP queries to 10.96.0.10:80, every answer from the VIP: b1 %d, b2 %d", udpSeen["b1"], udpSeen["b2"])

	// Hairpin: the client reaches itself through a Service.
	if c, who, err := client.dialTCP("10.96.0.10:81"); err != nil || who != "client" {
		t.Fatalf("hairpin: %v (answered by %q)", err, who)
	} else {
		if err := c.echo("me"); err != nil {
			t.Fatalf("hairpin echo: %v", err)
		}
		c.c.Close()
	}

	// No endpoints: refused at once, not a timeout.
	if _, _, err := client.dialTCP("10.96.0.11:80"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("service without endpoints: %v, want connection refused", err)
	}
	if _, _, err := client.udpAsk("10.96.0.11:53"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("UDP service without endpoints: %v, want connection refused (ICMP port unreachable)", err)
	}
	t.Log("hairpin through 10.96.0.10:81 reached the client itself; a Service without endpoints refused TCP (RST) and UDP (ICMP) at once")

	// Keep one established connection; remove the other backend.
	est, keep, err := client.dialTCP("10.96.0.10:80")
	if err != nil {
		t.Fatal(err)
	}
	defer est.c.Close()
	remaining := map[string]service.Backend{"b1": both[0], "b2": both[1]}[keep]
	desired[web] = []service.Backend{remaining}
	if err := r.Apply(desired.Lookup, []service.Frontend{web}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10; i++ {
		c, who, err := client.dialTCP("10.96.0.10:80")
		if err != nil {
			t.Fatal(err)
		}
		c.c.Close()
		if who != keep {
			t.Fatalf("new flow went to %s after it was removed; only %s remains", who, keep)
		}
	}
	if err := est.echo("still there"); err != nil {
		t.Fatalf("established flow to the remaining backend broke: %v", err)
	}
	t.Logf("after removing the other backend, 10 new connections all went to %s and the established one kept working", keep)

	// Agent-equivalent restart: drop every handle, load again from the pins, re-attach.
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := est.echo("while away"); err != nil {
		t.Fatalf("established flow broke while the agent was down: %v", err)
	}
	d2 := loadertest.New(t, cfg)
	lab.attachAll(d2)
	if err := est.echo("after restart"); err != nil {
		t.Fatalf("established flow broke across the restart: %v", err)
	}
	r2, err := lbmap.NewReconciler(d2.Maps(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := r2.Sync(desired); err != nil {
		t.Fatal(err)
	}
	if r2.Writes() != 0 {
		t.Fatalf("resync after restart rewrote %d entries; the maps should have survived", r2.Writes())
	}
	if c, who, err := client.dialTCP("10.96.0.10:80"); err != nil || who != keep {
		t.Fatalf("new flow after restart: %v (to %q)", err, who)
	} else {
		c.c.Close()
	}
	t.Log("agent-equivalent restart (close, reload from pins, re-attach): the established connection survived and the resync wrote nothing")
}
