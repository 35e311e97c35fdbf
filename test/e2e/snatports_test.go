package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/loader"
)

// TestNodeConnectionsBesideTranslatedFlows: the node's own connections use the address that
// NodePort SNAT and masquerade translate flows to. A translated flow holding the port the
// node's kernel picks for a connection to the same peer would put both on one wire tuple:
// the peer's answers to the node would go to the translated flow's client, and the node's
// connection would hang (seen as `web: host -> loadBalancerIP` dropping in TestConformance,
// once in about ten runs). The node connects here from a port of its ephemeral range that
// an external client (NodePort) or a pod (masquerade) used first, and the other way round;
// each side must keep working, and no translated flow may be given a port of that range.
func TestNodeConnectionsBesideTranslatedFlows(t *testing.T) {
	l := newMasqLab(t)
	pod := l.addENIPod(t, "web", "10.0.1.10")
	seen := func(c net.Addr) string { return c.String() } // the greeting: the peer as the server saw it
	serveTCPUDP(t, l.vpc, masqGateway+":9091", true, seen)
	serveTCPUDP(t, l.inet, internetAddr+":9092", true, seen)
	loadNodePort(t, l, []npSvc{{name: "remote", typ: corev1.ServiceTypeNodePort,
		ports: []corev1.ServicePort{npPort("http", corev1.ProtocolTCP, 9091, 30091)}, targets: []npTarget{{masqGateway, "node-b", 9091}}}})

	var eph loader.PortRange
	if err := nsutil.Do(l.node, func() (err error) { eph, err = loader.ReadLocalPortRange(); return err }); err != nil {
		t.Fatal(err)
	}
	node := &podNS{name: "node", ns: l.node, ip: netip.MustParseAddr(masqNodeAddr)}
	ext := &podNS{name: "internet", ns: l.inet, ip: netip.MustParseAddr(internetAddr)}
	nodePort := masqNodeAddr + ":30091"
	backend := masqGateway + ":9091"  // the NodePort's remote backend
	inetSrv := internetAddr + ":9092" // outside the VPC: the pod's flow is masqueraded

	// dial connects c from port to addr and returns the connection and the port the server
	// saw it from, which must be on the node's address.
	dial := func(what string, c *podNS, port int, addr string) (*conn, int) {
		t.Helper()
		cn, greet, err := c.dialTCPFrom(port, addr)
		if err != nil {
			t.Fatalf("%s: connect from port %d to %s: %v", what, port, addr, err)
		}
		t.Cleanup(func() { cn.c.Close() })
		ap, err := netip.ParseAddrPort(greet)
		if err != nil || ap.Addr().String() != masqNodeAddr {
			t.Fatalf("%s: the server saw %q, want the node's address %s", what, greet, masqNodeAddr)
		}
		return cn, int(ap.Port())
	}
	translated := func(what string, own, got int) {
		t.Helper()
		if got == own || (got >= int(eph.Min) && got <= int(eph.Max)) {
			t.Fatalf("%s from port %d left as port %d: inside the node's ephemeral range %s", what, own, got, eph)
		}
	}
	echo := func(what string, cs ...*conn) {
		t.Helper()
		for i, c := range cs {
			if err := c.echo(fmt.Sprintf("%s %d", what, i)); err != nil {
				t.Fatalf("%s: connection %d: %v", what, i, err)
			}
		}
	}

	for i, c := range []struct {
		what         string
		client       *podNS
		dst, nodeDst string // where the client connects, and the same peer as the node reaches it
	}{
		{"NodePort from the external client", ext, nodePort, backend},
		{"masqueraded pod", pod, inetSrv, inetSrv},
	} {
		p := int(eph.Min) + 1000 + 10*i
		// The translated flow first: its client's own port p is the node's to pick next.
		fc, fport := dial(c.what, c.client, p, c.dst)
		translated(c.what, p, fport)
		nc, nport := dial("the node after "+c.what, node, p, c.nodeDst)
		if nport != p {
			t.Fatalf("the node's connection from port %d reached the server as port %d", p, nport)
		}
		echo(c.what+", then the node", fc, nc)

		// The node's connection first, then a translated flow whose client has the same port.
		q := p + 5
		nc2, _ := dial("the node before "+c.what, node, q, c.nodeDst)
		fc2, fport2 := dial(c.what+" after the node", c.client, q, c.dst)
		translated(c.what, q, fport2)
		echo("the node, then "+c.what, nc2, fc2)
	}
}
