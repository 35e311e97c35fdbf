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
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/service/healthcheck"
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

func getFrom(h *lab.ExternalHost, addr string) (int, string, error) {
	var c net.Conn
	if err := nsutil.Do(h.NS, func() (err error) {
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

// eventually retries fn (a network probe through state the agents are still writing) until it
// returns nil or the deadline passes; the last error fails the test.
func eventually(t *testing.T, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(50 * time.Millisecond)
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

	clientAddr := ext.Addr.String()
	for _, c := range []struct{ what, addr, want string }{
		{"NodePort on the backend's node", n0.PrimaryIP + ":30080", clientAddr},
		{"NodePort on the other node (SNAT)", n1.PrimaryIP + ":30080", n1.PrimaryIP},
		{"eTP Local NodePort on the backend's node", n0.PrimaryIP + ":30081", clientAddr},
		{"eTP Local LoadBalancer IP", lbIP.String() + ":8080", clientAddr},
		{"eTP Local externalIP", extIP.String() + ":8080", clientAddr},
	} {
		eventually(t, c.what, func() error {
			who, err := whoFrom(ext, c.addr, time.Second)
			if err != nil {
				return err
			}
			if who != c.want {
				return fmt.Errorf("the backend saw the client as %s, want %s", who, c.want)
			}
			return nil
		})
	}
	// Settled: now each must hold on repeated connections.
	for i := 0; i < 5; i++ {
		if who, err := whoFrom(ext, n1.PrimaryIP+":30080", 3*time.Second); err != nil || who != n1.PrimaryIP {
			t.Fatalf("NodePort on the other node, connection %d: %q, %v", i, who, err)
		}
	}
	eventually(t, "NodePort without endpoints", func() error {
		_, err := whoFrom(ext, n0.PrimaryIP+":30082", time.Second)
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("connect: %v, want connection refused", err)
		}
		return nil
	})
	// eTP Local on the node without an endpoint: dropped (a timeout, not a refusal).
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
		want := healthcheck.Body(nn, c.n, true)
		eventually(t, "health check on "+c.node.Name, func() error {
			code, body, err := getFrom(ext, fmt.Sprintf("%s:%d", c.node.PrimaryIP, hc))
			if err != nil {
				return err
			}
			if code != c.code || body != want {
				return fmt.Errorf("%d %q, want %d %q", code, body, c.code, want)
			}
			return nil
		})
	}
}
