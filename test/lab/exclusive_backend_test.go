//go:build linux

package lab_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/service/healthcheck"
	"github.com/tern-net/tern/test/lab"
)

// TestExclusiveENIPodAsServiceBackend: an exclusive-ENI pod is the only backend of a
// Service, and its clients come from everywhere: another exclusive pod and an ENIIP pod on
// its own node, itself (hairpin), and an external client through the NodePort of its own node
// and of the other node, for TCP and UDP. The backend answers every packet that is not its
// own ENI's traffic from its default route, its ENI: a reply to a client whose flow the node
// translated must come back through veth1 instead, or it reaches the client untranslated
// (or, for a client outside the VPC, not at all). Each case states the source the backend
// sees.
func TestExclusiveENIPodAsServiceBackend(t *testing.T) {
	l := upExclusive(t, lab.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := l.Client()
	n0, n1 := l.Node(0), l.Node(1)
	const ns = "exbe"
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	const tcpPort, udpPort, nodePort, udpNodePort, localNodePort = 9090, 9053, 30193, 30194, 30195
	mk := func(name string, etp corev1.ServiceExternalTrafficPolicy, ports ...corev1.ServicePort) *corev1.Service {
		t.Helper()
		svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, ExternalTrafficPolicy: etp,
				Selector: map[string]string{"app": "ex-be"}, Ports: ports},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return svc
	}
	svc := mk("cluster", corev1.ServiceExternalTrafficPolicyCluster,
		corev1.ServicePort{Name: "tcp", Port: 80, NodePort: nodePort, TargetPort: intstr.FromInt32(tcpPort), Protocol: corev1.ProtocolTCP},
		corev1.ServicePort{Name: "udp", Port: 53, NodePort: udpNodePort, TargetPort: intstr.FromInt32(udpPort), Protocol: corev1.ProtocolUDP})

	// externalTrafficPolicy Local keeps the client's address, which the exclusive backend
	// would answer through its ENI: it is no Local backend of its node (a LoadBalancer, for
	// the healthCheckNodePort).
	localSvc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "local"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal,
			Selector: map[string]string{"app": "ex-be"}, Ports: []corev1.ServicePort{
				{Name: "tcp", Port: 80, NodePort: localNodePort, TargetPort: intstr.FromInt32(tcpPort), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	exAnn := map[string]string{ipam.AnnotationENI: "true"}
	be, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "ex-be", Node: n0.Name, Labels: map[string]string{"app": "ex-be"}, Annotations: exAnn})
	if err != nil {
		t.Fatal(err)
	}
	checkExclusivePod(t, l, ctx, be)
	serveWho(t, be, tcpPort)
	serveWhoUDP(t, be, udpPort)
	exClient, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "ex-client", Node: n0.Name, Annotations: exAnn})
	if err != nil {
		t.Fatal(err)
	}
	checkExclusivePod(t, l, ctx, exClient)
	podClient, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "pod-client", Node: n0.Name})
	if err != nil {
		t.Fatal(err)
	}
	ext, err := l.ExternalClient()
	if err != nil {
		t.Fatal(err)
	}

	beTCP, beUDP := netip.AddrPortFrom(be.IP, tcpPort), netip.AddrPortFrom(be.IP, udpPort)
	vip := netip.MustParseAddr(svc.Spec.ClusterIP)
	for _, n := range []*lab.Node{n0, n1} {
		waitBackends(t, n, netip.AddrPortFrom(vip, 80), "TCP", beTCP)
		waitBackends(t, n, netip.AddrPortFrom(vip, 53), "UDP", beUDP)
		waitBackends(t, n, netip.AddrPortFrom(netip.MustParseAddr(n.PrimaryIP), nodePort), "TCP", beTCP)
		waitBackends(t, n, netip.AddrPortFrom(netip.MustParseAddr(n.PrimaryIP), udpNodePort), "UDP", beUDP)
	}

	clusterTCP := net.JoinHostPort(svc.Spec.ClusterIP, "80")
	clusterUDP := net.JoinHostPort(svc.Spec.ClusterIP, "53")
	np := func(n *lab.Node, port int) string { return net.JoinHostPort(n.PrimaryIP, strconv.Itoa(port)) }
	cases := []struct {
		name  string
		from  netns.NsHandle
		proto string
		addr  string
		seen  string
	}{
		{"exclusive pod -> ClusterIP, exclusive backend on its node", exClient.NS(), "tcp", clusterTCP, n0.PrimaryIP},
		{"exclusive pod -> ClusterIP UDP, exclusive backend on its node", exClient.NS(), "udp", clusterUDP, n0.PrimaryIP},
		{"ENIIP pod -> ClusterIP, exclusive backend on its node", podClient.NS(), "tcp", clusterTCP, podClient.IP.String()},
		{"ENIIP pod -> ClusterIP UDP, exclusive backend on its node", podClient.NS(), "udp", clusterUDP, podClient.IP.String()},
		{"the backend -> its own ClusterIP (hairpin)", be.NS(), "tcp", clusterTCP, n0.PrimaryIP},
		{"the backend -> its own ClusterIP UDP (hairpin)", be.NS(), "udp", clusterUDP, n0.PrimaryIP},
		{"external -> NodePort of the backend's node (eTP Cluster)", ext.NS(), "tcp", np(n0, nodePort), n0.PrimaryIP},
		{"external -> NodePort UDP of the backend's node (eTP Cluster)", ext.NS(), "udp", np(n0, udpNodePort), n0.PrimaryIP},
		{"external -> NodePort of the other node (eTP Cluster)", ext.NS(), "tcp", np(n1, nodePort), n1.PrimaryIP},
		{"external -> NodePort UDP of the other node (eTP Cluster)", ext.NS(), "udp", np(n1, udpNodePort), n1.PrimaryIP},
	}
	for _, tc := range cases {
		// Several flows each, so a port collision or a lost first packet would show.
		for i := range 5 {
			var who, seen string
			var err error
			if tc.proto == "udp" {
				who, seen, err = askWhoUDP(ctx, tc.from, tc.addr, 3*time.Second)
			} else {
				who, seen, err = dialWho(ctx, tc.from, tc.addr, 3*time.Second)
			}
			host, _, _ := net.SplitHostPort(seen)
			if err != nil || who != be.Name || host != tc.seen {
				t.Errorf("%s (%s, flow %d): answer %q from %q, %v; want %s seeing %s", tc.name, tc.addr, i, who, seen, err, be.Name, tc.seen)
				break
			}
		}
	}

	// eTP Local on the backend's node: no local backend, so dropped (not refused, not
	// answered with a translated source), the health check reports no local endpoint, and
	// the agent says why (metric, Warning Event).
	// The metric first: once it counts the endpoint, the agent has translated the Service
	// with it (an empty frontend alone could be one from before the endpoint existed).
	const skipped = "tern_service_exclusive_local_endpoints_skipped 1"
	for deadline := time.Now().Add(30 * time.Second); ; {
		m, err := n0.Client().Metrics(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if slices.Contains(strings.Split(m, "\n"), skipped) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 30s %s's metrics do not count the left-out exclusive endpoint (want %q)", n0.Name, skipped)
		}
		time.Sleep(100 * time.Millisecond)
	}
	localNP := netip.AddrPortFrom(netip.MustParseAddr(n0.PrimaryIP), localNodePort)
	waitBackends(t, n0, localNP, "TCP")
	if who, seen, err := dialWho(ctx, ext.NS(), localNP.String(), 700*time.Millisecond); err == nil || errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("eTP Local NodePort whose only local endpoint is exclusive: %q seeing %q, %v; want a timeout", who, seen, err)
	}
	// In-cluster clients of the same NodePort get every endpoint (its cluster-wide twin).
	if who, seen, err := dialWho(ctx, exClient.NS(), localNP.String(), 3*time.Second); err != nil || who != be.Name {
		t.Errorf("exclusive pod -> eTP Local NodePort of its node: %q seeing %q, %v; want %s", who, seen, err, be.Name)
	}
	hc := localSvc.Spec.HealthCheckNodePort
	if hc == 0 {
		t.Fatal("the apiserver allocated no healthCheckNodePort")
	}
	want := healthcheck.Body(types.NamespacedName{Namespace: ns, Name: "local"}, 0, true)
	if code, body, err := getIn(ext.NS(), fmt.Sprintf("%s:%d", n0.PrimaryIP, hc)); err != nil || code != 503 || body != want {
		t.Errorf("health check of the eTP Local Service on %s: %d %q (%v), want 503 %q", n0.Name, code, body, err, want)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		evs, err := c.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=local,reason=ExclusiveENIEndpointNotLocal"})
		if err != nil {
			t.Fatal(err)
		}
		if len(evs.Items) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no ExclusiveENIEndpointNotLocal Event on the eTP Local Service after 30s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}
