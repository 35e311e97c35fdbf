package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/healthcheck"
	"github.com/tern-net/tern/service/lbmap"
)

// NodePort, LoadBalancer IP and externalIP from an external client, in the masquerade lab
// (masquerade_test.go): the internet host (203.0.113.10, a namespace of its own) reaches
// the node's primary address 10.0.0.10. The local backend is an ENI pod (10.0.1.10); the
// remote backend, "a pod on another node", is the VPC namespace's own 10.0.0.1, which routes
// the replies it sends to 10.0.0.10 back through the node. Services go through the real
// translation (service.Translator for node "node-a") and the real map reconciler.
const (
	npLBIP       = "192.0.2.100"
	npLBIPClosed = "192.0.2.101"
	npExtIP      = "198.51.100.5"
)

type npSvc struct {
	name    string
	typ     corev1.ServiceType
	etp     corev1.ServiceExternalTrafficPolicy
	ports   []corev1.ServicePort
	lbIP    string
	extIP   string
	ranges  []string
	hcPort  int32
	targets []npTarget
}

type npTarget struct {
	addr, node string
	port       int32
}

func (s npSvc) objects(i int) (*corev1.Service, []*discoveryv1.EndpointSlice) {
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "e2e", Name: s.name},
		Spec: corev1.ServiceSpec{Type: s.typ, ClusterIPs: []string{fmt.Sprintf("10.96.0.%d", 10+i)},
			ExternalTrafficPolicy: s.etp, Ports: s.ports, LoadBalancerSourceRanges: s.ranges, HealthCheckNodePort: s.hcPort}}
	if s.lbIP != "" {
		svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: s.lbIP}}
	}
	if s.extIP != "" {
		svc.Spec.ExternalIPs = []string{s.extIP}
	}
	sl := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: "e2e", Name: s.name + "-1",
		Labels: map[string]string{discoveryv1.LabelServiceName: s.name}}, AddressType: discoveryv1.AddressTypeIPv4}
	for _, p := range s.ports {
		if len(s.targets) == 0 {
			break
		}
		sl.Ports = append(sl.Ports, discoveryv1.EndpointPort{Name: ptr.To(p.Name), Protocol: ptr.To(p.Protocol), Port: ptr.To(s.targets[0].port)})
	}
	for _, tg := range s.targets {
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{Addresses: []string{tg.addr}, NodeName: ptr.To(tg.node),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}})
	}
	if len(s.targets) == 0 {
		return svc, nil // no EndpointSlice at all, as for a Service without a selector
	}
	return svc, []*discoveryv1.EndpointSlice{sl}
}

// loadNodePort loads the datapath into the masquerade lab (loadMasq) with NodePort SNAT to
// the node's primary address and programs svcs through the real translation (node "node-a")
// and map reconciler.
func loadNodePort(t *testing.T, l *masqLab, svcs []npSvc) *loader.Datapath {
	t.Helper()
	d := loadMasq(t, l, loader.Config{NodePortAddr: netip.MustParseAddr(masqNodeAddr)})
	m := d.Maps()
	b := service.NewBuilderFor(service.Translator{Node: service.Node{Name: "node-a", Addrs: []netip.Addr{netip.MustParseAddr(masqNodeAddr)}}})
	for i, s := range svcs {
		svc, eps := s.objects(i)
		if _, err := b.Set(types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}, svc, eps); err != nil {
			t.Fatalf("translate %s: %v", s.name, err)
		}
	}
	rec, err := lbmap.NewReconciler(m, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := rec.SyncWith(b.State(), b.Options); err != nil {
		t.Fatal(err)
	}
	return d
}

func npPort(name string, proto corev1.Protocol, port, nodePort int32) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Protocol: proto, Port: port, NodePort: nodePort, TargetPort: intstr.FromInt32(port)}
}

// TestNodePortFromAnExternalClient: the external client reaches a NodePort whose backend is
// on this node (it sees the client's own address) and one whose backend is on another node
// (DNAT + SNAT: it sees the node's address), TCP and UDP; with externalTrafficPolicy Local
// the NodePort, the LoadBalancer IP and the externalIP all go to the local endpoint only and
// keep the client's address, and without a local endpoint the packets are dropped; a
// NodePort without endpoints refuses the connection (RST); a LoadBalancer IP whose
// loadBalancerSourceRanges leave the client out drops it; the healthCheckNodePort answers
// the external client 200 or 503 with kube-proxy's body.
func TestNodePortFromAnExternalClient(t *testing.T) {
	l := newMasqLab(t)
	pod := l.addENIPod(t, "web", "10.0.1.10")
	serveWho(t, pod.ns, ":8080")
	serveWho(t, l.vpc, masqGateway+":9090")
	// The VPC routes the load balancer and external IPs to the node.
	err := nsutil.Do(l.vpc, func() error {
		v0, err := netlink.LinkByName("vpc0")
		if err != nil {
			return err
		}
		for _, ip := range []string{npLBIP, npLBIPClosed, npExtIP} {
			_, dst, _ := net.ParseCIDR(ip + "/32")
			if err := netlink.RouteAdd(&netlink.Route{Dst: dst, Gw: net.ParseIP(masqNodeAddr), LinkIndex: v0.Attrs().Index}); err != nil {
				return fmt.Errorf("route %s via the node: %w", ip, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	local := npTarget{"10.0.1.10", "node-a", 8080}
	remote := npTarget{masqGateway, "node-b", 9090}
	svcs := []npSvc{
		{name: "local", typ: corev1.ServiceTypeNodePort, ports: []corev1.ServicePort{npPort("http", corev1.ProtocolTCP, 8080, 30080)}, targets: []npTarget{local}},
		{name: "remote", typ: corev1.ServiceTypeNodePort, ports: []corev1.ServicePort{npPort("http", corev1.ProtocolTCP, 9090, 30081),
			npPort("dns", corev1.ProtocolUDP, 9090, 30081)}, targets: []npTarget{remote}},
		{name: "etp-local", typ: corev1.ServiceTypeLoadBalancer, etp: corev1.ServiceExternalTrafficPolicyLocal,
			ports: []corev1.ServicePort{npPort("http", corev1.ProtocolTCP, 8080, 30082)}, lbIP: npLBIP, extIP: npExtIP,
			ranges: []string{"203.0.113.0/24"}, hcPort: 32000,
			targets: []npTarget{local, {masqGateway, "node-b", 8080}}},
		{name: "empty", typ: corev1.ServiceTypeNodePort, ports: []corev1.ServicePort{npPort("http", corev1.ProtocolTCP, 80, 30083)}},
		{name: "none-here", typ: corev1.ServiceTypeLoadBalancer, etp: corev1.ServiceExternalTrafficPolicyLocal,
			ports: []corev1.ServicePort{npPort("http", corev1.ProtocolTCP, 9090, 30084)}, hcPort: 32001, targets: []npTarget{remote}},
		{name: "closed", typ: corev1.ServiceTypeLoadBalancer, ports: []corev1.ServicePort{npPort("http", corev1.ProtocolTCP, 8080, 30085)},
			lbIP: npLBIPClosed, ranges: []string{"198.51.100.0/24"}, targets: []npTarget{local}},
		// Backends with no socket on the target port: their kernels answer port unreachable.
		{name: "deaf", typ: corev1.ServiceTypeNodePort, ports: []corev1.ServicePort{npPort("dns", corev1.ProtocolUDP, 5999, 30086)},
			targets: []npTarget{{"10.0.1.10", "node-a", 5999}}},
		{name: "deaf-remote", typ: corev1.ServiceTypeNodePort, ports: []corev1.ServicePort{npPort("dns", corev1.ProtocolUDP, 5999, 30087)},
			targets: []npTarget{{masqGateway, "node-b", 5999}}},
	}
	m := loadNodePort(t, l, svcs).Maps()
	hc := healthcheck.New([]netip.Addr{netip.MustParseAddr(masqNodeAddr)}, nil, nil)
	t.Cleanup(hc.Close)
	for i, s := range svcs {
		svc, eps := s.objects(i)
		// The health servers listen in the node's namespace, as the agent runs there.
		err := nsutil.Do(l.node, func() error {
			nn := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
			return hc.Update(nn, healthcheck.Port(svc), healthcheck.LocalReadyEndpoints("node-a", eps))
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	client := &podNS{name: "internet", ns: l.inet, ip: netip.MustParseAddr(internetAddr)}
	for _, c := range []struct {
		what, dst, wantSeen string
	}{
		{"NodePort, local backend (client kept)", masqNodeAddr + ":30080", internetAddr},
		{"NodePort, remote backend (SNAT to the node)", masqNodeAddr + ":30081", masqNodeAddr},
		{"eTP Local NodePort", masqNodeAddr + ":30082", internetAddr},
		{"eTP Local LoadBalancer IP, client inside its ranges", npLBIP + ":8080", internetAddr},
		{"eTP Local externalIP", npExtIP + ":8080", internetAddr},
	} {
		// Several connections: with eTP Local every one must land on the local endpoint.
		for i := 0; i < 4; i++ {
			cn, who, err := client.dialTCP(c.dst)
			if err != nil {
				t.Fatalf("%s: connect %d: %v", c.what, i, err)
			}
			if who != c.wantSeen {
				cn.c.Close()
				t.Fatalf("%s: the backend saw the client as %s, want %s", c.what, who, c.wantSeen)
			}
			if err := cn.echo("hello"); err != nil {
				t.Fatalf("%s: echo: %v", c.what, err)
			}
			if got := cn.c.RemoteAddr().String(); got != c.dst {
				t.Fatalf("%s: the client's peer is %s, want the frontend %s", c.what, got, c.dst)
			}
			cn.c.Close()
		}
	}
	ans, from, err := client.udpAsk(masqNodeAddr + ":30081")
	if err != nil || ans != masqNodeAddr || from.String() != masqNodeAddr+":30081" {
		t.Fatalf("UDP NodePort, remote backend: saw %q, answer from %s, err %v; want %s seen, answer from the frontend", ans, from, err, masqNodeAddr)
	}

	// A backend without a socket on the port: its port unreachable reaches the client's
	// connected socket as ECONNREFUSED, turned back to the frontend (bpf/lib/svcicmp.h) on
	// the way out (local backend) or in (remote backend, SNAT flow), as kube-proxy's
	// conntrack does; untranslated, the client would wait for an answer.
	for _, dst := range []string{masqNodeAddr + ":30086", masqNodeAddr + ":30087"} {
		if _, _, err := client.udpAsk(dst); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("UDP NodePort %s to a backend nobody listens on: %v, want ECONNREFUSED", dst, err)
		}
	}
	for _, dir := range []loader.Direction{loader.DirToNetdev, loader.DirFromNetdev} {
		if n := loadertest.Metric(t, m, loader.ReasonSvcICMPError, dir); n == 0 {
			t.Fatalf("nothing counted under svc_icmp_error/%s", dir)
		}
	}

	// No endpoints: refused at once (a RST from the frontend), as kube-proxy rejects.
	if _, _, err := client.dialTCP(masqNodeAddr + ":30083"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("NodePort without endpoints: %v, want connection refused", err)
	}
	if n := loadertest.Metric(t, m, loader.ReasonSvcReject, loader.DirFromNetdev); n == 0 {
		t.Fatal("nothing counted under svc_reject/from-netdev")
	}
	// Dropped, not refused: eTP Local without a local endpoint, and a client outside the
	// LoadBalancer IP's source ranges. The counters say why; the connect must time out.
	for _, c := range []struct {
		what, dst string
		reason    loader.Reason
	}{
		{"eTP Local without a local endpoint", masqNodeAddr + ":30084", loader.ReasonDropNoLocalBackend},
		{"client outside loadBalancerSourceRanges", npLBIPClosed + ":8080", loader.ReasonDropSrcRange},
	} {
		before := loadertest.Metric(t, m, c.reason, loader.DirFromNetdev)
		err := nsutil.Do(l.inet, func() error {
			cn, err := (&net.Dialer{Timeout: 700 * time.Millisecond}).Dial("tcp4", c.dst)
			if err == nil {
				cn.Close()
			}
			return err
		})
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("%s: connect %v, want a timeout (dropped)", c.what, err)
		}
		if n := loadertest.Metric(t, m, c.reason, loader.DirFromNetdev); n <= before {
			t.Fatalf("%s: nothing counted under %s/from-netdev", c.what, c.reason)
		}
	}
	// A pod reaching the eTP Local NodePort that drops external clients is served by the
	// remote endpoint (in-cluster clients get every endpoint, as with kube-proxy) and keeps
	// its own address.
	// Each connection is closed here: one left open keeps its server's echo goroutine, which
	// the server's cleanup waits for, until a garbage collection finalises the client's
	// socket (on 6.1 under qemu the cleanup waited about 130 s for it; the test now takes 9 s
	// there).
	cn, who, err := pod.dialTCP(masqNodeAddr + ":30084")
	if err != nil || who != pod.ip.String() {
		t.Fatalf("pod to the eTP Local NodePort without a local endpoint: saw %q, %v; want served, seen as %s", who, err, pod.ip)
	}
	cn.c.Close()
	// The NodePort of the Service with the closed LoadBalancer IP stays open (ranges apply
	// to the LoadBalancer IP only, as with kube-proxy).
	cn, who, err = client.dialTCP(masqNodeAddr + ":30085")
	if err != nil || who != internetAddr {
		t.Fatalf("NodePort of a Service with source ranges: %q, %v", who, err)
	}
	cn.c.Close()
	for _, c := range []struct{ port, code, n int }{{32000, 200, 1}, {32001, 503, 0}} {
		name := map[int]string{32000: "etp-local", 32001: "none-here"}[c.port]
		code, body, err := httpGetIn(l.inet, fmt.Sprintf("%s:%d", masqNodeAddr, c.port))
		if err != nil {
			t.Fatal(err)
		}
		want := healthcheck.Body(types.NamespacedName{Namespace: "e2e", Name: name}, c.n, true)
		if code != c.code || body != want {
			t.Fatalf("health check of %s: %d %q, want %d %q", name, code, body, c.code, want)
		}
	}
	for _, r := range []loader.Reason{loader.ReasonNodePortForward, loader.ReasonNodePortSNAT, loader.ReasonNodePortRevNAT} {
		if loadertest.Metric(t, m, r, loader.DirFromNetdev) == 0 {
			t.Errorf("nothing counted under %s/from-netdev", r)
		}
	}
	if loadertest.Metric(t, m, loader.ReasonNodePortRevNAT, loader.DirToNetdev) == 0 {
		t.Error("nothing counted under nodeport_revnat/to-netdev (local backends' replies)")
	}
}

// httpGetIn makes one GET from inside ns. The connection is dialled on the namespace's
// thread (an http.Transport would dial from another goroutine, outside it).
func httpGetIn(ns netns.NsHandle, addr string) (int, string, error) {
	var c net.Conn
	err := nsutil.Do(ns, func() (err error) {
		c, err = (&net.Dialer{Timeout: 3 * time.Second}).Dial("tcp4", addr)
		return err
	})
	if err != nil {
		return 0, "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", addr); err != nil {
		return 0, "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}
