package lab_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/service/healthcheck"
	"github.com/tern-net/tern/ternctl"
	"github.com/tern-net/tern/test/lab"
)

// whoFrom connects from the external host to addr and returns the client address the
// backend (serveWho) saw.
func whoFrom(h *lab.ExternalHost, addr string, timeout time.Duration) (string, error) {
	var c net.Conn
	if err := nsutil.Do(h.NS, func() (err error) {
		c, err = (&net.Dialer{Timeout: timeout}).Dial("tcp4", addr)
		return err
	}); err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	s, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", err
	}
	// serveWho's "<pod name> <client ip:port>"
	f := strings.Fields(s)
	if len(f) != 2 {
		return "", fmt.Errorf("answer %q from %s, want \"<pod> <client address>\"", s, addr)
	}
	ip, _, err := net.SplitHostPort(f[1])
	return ip, err
}

func getFrom(h *lab.ExternalHost, addr string) (int, string, error) { return getIn(h.NS, addr) }

// getIn is getFrom from inside namespace ns.
func getIn(ns netns.NsHandle, addr string) (int, string, error) {
	var c net.Conn
	if err := nsutil.Do(ns, func() (err error) {
		c, err = (&net.Dialer{Timeout: 3 * time.Second}).Dial("tcp4", addr)
		return err
	}); err != nil {
		return 0, "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", addr)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// waitProgrammed waits until node n's agent has programmed the externally reachable
// ("all" scope) frontend/TCP with exactly the backends want — none for a frontend that must
// refuse or drop — read from the node's pinned service map. The agent updates a Service's
// healthCheckNodePort server before it writes the Service's map entries, so once they are
// there the health check answers for the same endpoints too. It fails the test after 30 s.
func waitProgrammed(t *testing.T, n *lab.Node, frontend netip.AddrPort, want ...netip.AddrPort) {
	t.Helper()
	want = slices.SortedFunc(slices.Values(want), netip.AddrPort.Compare)
	deadline := time.Now().Add(30 * time.Second)
	for {
		svcs, err := ternctl.ReadServicesAt(n.PinRoot())
		if err != nil {
			t.Fatalf("read the pinned service map of %s: %v", n.Name, err)
		}
		var got []netip.AddrPort
		found := false
		for _, s := range svcs {
			if s.Frontend == frontend && s.Proto == "TCP" && s.Scope == "all" {
				found = true
				got = slices.SortedFunc(slices.Values(s.BackendAddrs()), netip.AddrPort.Compare)
			}
		}
		if found && slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 30s %s's service map has %s/TCP: present %v, backends %v; want backends %v", n.Name, frontend, found, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestNodePortFromOutside: a client outside the VPC (its own namespace behind the VPC
// router) reaches a NodePort on each node: on the backend's node the backend sees the
// client, on the other the node's address (SNAT); a LoadBalancer Service with
// externalTrafficPolicy Local serves its NodePort, LoadBalancer IP and externalIP with the
// client's address kept, drops on the node without an endpoint, and each node's agent
// answers its healthCheckNodePort 200 / 503 as kube-proxy; a NodePort without endpoints
// refuses the connection.
func TestNodePortFromOutside(t *testing.T) {
	l := upKubernetes(t, lab.Options{Nodes: 2})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := l.Client()
	const ns = "np"
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	ext, err := l.AddExternalHost(netip.MustParseAddr("203.0.113.10"))
	if err != nil {
		t.Fatal(err)
	}
	n0, n1 := l.Node(0), l.Node(1)
	lbIP, extIP := netip.MustParseAddr("198.18.0.100"), netip.MustParseAddr("198.18.0.5")
	for _, ip := range []netip.Addr{lbIP, extIP} {
		if err := l.RouteToNode(ip, n0); err != nil {
			t.Fatal(err)
		}
	}
	web, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "web", Node: n0.Name, Labels: map[string]string{"app": "web"}})
	if err != nil {
		t.Fatal(err)
	}
	serveWho(t, web, 8080)

	mk := func(name string, typ corev1.ServiceType, etp corev1.ServiceExternalTrafficPolicy, nodePort int32, selector map[string]string, extIPs []string) *corev1.Service {
		t.Helper()
		s, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{Type: typ, ExternalTrafficPolicy: etp, Selector: selector, ExternalIPs: extIPs,
				Ports: []corev1.ServicePort{{Name: "http", Port: 8080, NodePort: nodePort, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	mk("cluster", corev1.ServiceTypeNodePort, corev1.ServiceExternalTrafficPolicyCluster, 30080, map[string]string{"app": "web"}, nil)
	local := mk("local", corev1.ServiceTypeLoadBalancer, corev1.ServiceExternalTrafficPolicyLocal, 30081, map[string]string{"app": "web"}, []string{extIP.String()})
	local.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: lbIP.String()}}
	if _, err := c.CoreV1().Services(ns).UpdateStatus(ctx, local, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	mk("empty", corev1.ServiceTypeNodePort, corev1.ServiceExternalTrafficPolicyCluster, 30082, map[string]string{"app": "nobody"}, nil)

	// Each probe waits until the node it goes to has programmed the frontend with the
	// backends it must use, then connects once and must get the answer.
	clientAddr := ext.Addr.String()
	backend := netip.AddrPortFrom(web.IP, 8080)
	ip0, ip1 := netip.MustParseAddr(n0.PrimaryIP), netip.MustParseAddr(n1.PrimaryIP)
	for _, c := range []struct {
		what     string
		node     *lab.Node
		frontend netip.AddrPort
		want     string
	}{
		{"NodePort on the backend's node", n0, netip.AddrPortFrom(ip0, 30080), clientAddr},
		{"NodePort on the other node (SNAT)", n1, netip.AddrPortFrom(ip1, 30080), n1.PrimaryIP},
		{"eTP Local NodePort on the backend's node", n0, netip.AddrPortFrom(ip0, 30081), clientAddr},
		{"eTP Local LoadBalancer IP", n0, netip.AddrPortFrom(lbIP, 8080), clientAddr},
		{"eTP Local externalIP", n0, netip.AddrPortFrom(extIP, 8080), clientAddr},
	} {
		waitProgrammed(t, c.node, c.frontend, backend)
		who, err := whoFrom(ext, c.frontend.String(), 3*time.Second)
		if err != nil || who != c.want {
			t.Fatalf("%s (%s): the backend saw the client as %q (%v), want %s", c.what, c.frontend, who, err, c.want)
		}
	}
	// Settled: now each must hold on repeated connections.
	for i := 0; i < 5; i++ {
		if who, err := whoFrom(ext, n1.PrimaryIP+":30080", 3*time.Second); err != nil || who != n1.PrimaryIP {
			t.Fatalf("NodePort on the other node, connection %d: %q, %v", i, who, err)
		}
	}
	waitProgrammed(t, n0, netip.AddrPortFrom(ip0, 30082)) // no endpoints: refuse
	if _, err := whoFrom(ext, n0.PrimaryIP+":30082", 3*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("NodePort without endpoints: connect: %v, want connection refused", err)
	}
	// eTP Local on the node without an endpoint: dropped (a timeout, not a refusal).
	waitProgrammed(t, n1, netip.AddrPortFrom(ip1, 30081))
	if _, err := whoFrom(ext, n1.PrimaryIP+":30081", 700*time.Millisecond); err == nil || errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("eTP Local NodePort on a node without an endpoint: %v, want a timeout", err)
	}

	hc := local.Spec.HealthCheckNodePort
	if hc == 0 {
		t.Fatal("the apiserver allocated no healthCheckNodePort")
	}
	nn := types.NamespacedName{Namespace: ns, Name: "local"}
	for _, c := range []struct {
		node *lab.Node
		code int
		n    int
	}{{n0, 200, 1}, {n1, 503, 0}} {
		// Programmed on both nodes above (the health server is updated before the map).
		want := healthcheck.Body(nn, c.n, true)
		code, body, err := getFrom(ext, fmt.Sprintf("%s:%d", c.node.PrimaryIP, hc))
		if err != nil || code != c.code || body != want {
			t.Fatalf("health check on %s: %d %q (%v), want %d %q", c.node.Name, code, body, err, c.code, want)
		}
	}
}
