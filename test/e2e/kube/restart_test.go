//go:build linux

package kube_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/tern-net/tern/ternctl"
	"github.com/tern-net/tern/test/lab"
)

// echoConn is an established connection through a ClusterIP to a Pod.Serve backend.
type echoConn struct {
	c net.Conn
	r *bufio.Reader
}

func dialEcho(t *testing.T, ctx context.Context, from dialer, addr string) (*echoConn, string) {
	t.Helper()
	c, err := from.Dial(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	e := &echoConn{c: c, r: bufio.NewReader(c)}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	greet, err := e.r.ReadString('\n')
	if err != nil {
		t.Fatalf("greeting over %s: %v", addr, err)
	}
	return e, strings.TrimSpace(greet)
}

func (e *echoConn) echo(t *testing.T, msg string) {
	t.Helper()
	e.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(e.c, "%s\n", msg); err != nil {
		t.Fatalf("send %q on the established connection: %v", msg, err)
	}
	got, err := e.r.ReadString('\n')
	if err != nil || strings.TrimSpace(got) != msg {
		t.Fatalf("echo of %q on the established connection: %q, %v", msg, got, err)
	}
}

// Established connections through a ClusterIP survive agent restarts on both ends (SIGTERM
// and kill -9), and the restarted agents keep serving new connections.
func TestAgentRestartKeepsConnections(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const ns = "e2e-restart"
	app := map[string]string{"app": "echo"}
	if _, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "echo", Node: "node-1", Labels: app, ServePort: 7000}); err != nil {
		t.Fatal(err)
	}
	client, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "client", Node: "node-2"})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := l.Client().CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: corev1.ServiceSpec{Selector: app, Ports: []corev1.ServicePort{
			{Port: 7000, TargetPort: intstr.FromString("serve"), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 7000)
	onEveryNode(t, l, addr, "TCP", []string{netip.AddrPortFrom(l.Pod(ns, "echo").IP, 7000).String()})

	conn, who := dialEcho(t, ctx, client, addr.String())
	defer conn.c.Close()
	if who != ns+"/echo" {
		t.Fatalf("greeted by %q", who)
	}
	conn.echo(t, "before")

	for _, step := range []struct {
		node string
		kill bool
	}{{"node-2", false}, {"node-2", true}, {"node-1", true}} {
		n, err := l.NodeByName(step.node)
		if err != nil {
			t.Fatal(err)
		}
		if step.kill {
			err = n.KillAgent()
		} else {
			err = n.StopAgent()
		}
		if err != nil {
			t.Fatal(err)
		}
		conn.echo(t, "agent of "+step.node+" is down")
		if err := n.StartAgent(ctx); err != nil {
			t.Fatal(err)
		}
		conn.echo(t, "agent of "+step.node+" is back")
		c2, who := dialEcho(t, ctx, client, addr.String())
		if who != ns+"/echo" {
			t.Fatalf("new connection after restarting %s's agent greeted by %q", step.node, who)
		}
		c2.echo(t, "new")
		c2.c.Close()
		t.Logf("agent of %s %s and restarted: the established connection kept working", step.node,
			map[bool]string{true: "killed (-9)", false: "stopped (SIGTERM)"}[step.kill])
	}
}

// After an apiserver restart the agents' watches resume: a change made afterwards reaches
// every node's maps.
func TestAPIServerRestart(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const ns = "e2e-apiserver"
	app := map[string]string{"app": "web"}
	a, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "a", Node: "node-1", Labels: app, HTTPPort: 8080})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := l.Client().CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: app, Ports: []corev1.ServicePort{
			{Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	front := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)
	onEveryNode(t, l, front, "TCP", []string{netip.AddrPortFrom(a.IP, 8080).String()})

	if err := l.ControlPlane().RestartAPIServer(ctx); err != nil {
		t.Fatal(err)
	}
	b, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "b", Node: "node-2", Labels: app, HTTPPort: 8080})
	if err != nil {
		t.Fatal(err)
	}
	onEveryNode(t, l, front, "TCP", []string{netip.AddrPortFrom(a.IP, 8080).String(), netip.AddrPortFrom(b.IP, 8080).String()})
	client, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "client", Node: "node-1"})
	if err != nil {
		t.Fatal(err)
	}
	if seen := whoAnswers(t, client, "http://"+front.String()+"/", 20); seen["a"] == 0 || seen["b"] == 0 {
		t.Fatalf("after the apiserver restart answers came from %v, want a and b", seen)
	}
}

// 500 Services with 5 endpoints each converge on both nodes.
func TestManyServicesConverge(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const (
		ns        = "e2e-many"
		services  = 500
		endpoints = 5
	)
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	c := l.Client()
	start := time.Now()
	// Services without selectors, with EndpointSlices written directly, as for external
	// backends: it exercises the same watch path without 2,500 pods.
	errs := make(chan error, services)
	work := make(chan int)
	for w := 0; w < 8; w++ {
		go func() {
			for i := range work {
				errs <- createService(ctx, c, ns, i, endpoints)
			}
		}()
	}
	for i := 0; i < services; i++ {
		work <- i
	}
	close(work)
	for i := 0; i < services; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	written := time.Since(start)
	for _, n := range l.Nodes() {
		eventually(t, 3*time.Minute, "500 services on "+n.Name, func() (bool, string) {
			svcs, err := ternctl.ReadServicesAt(n.PinRoot())
			if err != nil {
				return false, err.Error()
			}
			// Other tests' Services may be there too; count ours by their backend range.
			ours := 0
			for _, s := range svcs {
				if len(s.Backends) == endpoints && strings.HasPrefix(s.Backends[0].Address.Addr().String(), "10.250.") {
					ours++
				}
			}
			return ours == services, fmt.Sprintf("%d of %d with %d backends", ours, services, endpoints)
		})
	}
	t.Logf("500 Services x 5 endpoints: written through the API in %s, on both nodes' maps %s after the first write",
		written.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
}

// createService makes Service i without a selector and one EndpointSlice with its
// endpoints (addresses in 10.250.0.0/16: API data only, no traffic goes there).
func createService(ctx context.Context, c kubernetes.Interface, ns string, i, endpoints int) error {
	name := fmt.Sprintf("many-%03d", i)
	if _, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create service %s: %w", name, err)
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: name + "-1", Labels: map[string]string{
			discoveryv1.LabelServiceName: name, discoveryv1.LabelManagedBy: "tern-e2e"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports: []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080),
			Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	for e := 0; e < endpoints; e++ {
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{fmt.Sprintf("10.250.%d.%d", i/40, (i%40)*5+e+1)},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}})
	}
	if _, err := c.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create endpoint slice of %s: %w", name, err)
	}
	return nil
}
