//go:build linux

package lab_test

import (
	"context"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/test/lab"
)

// TestExclusiveENIPodServicesWithRemoteBackends: an exclusive-ENI pod reaches, through its
// veth1, a ClusterIP (TCP and UDP) and a NodePort on its own node's address whose only
// backend is on the OTHER node. The backend's reply would go to the pod's address, which the
// VPC delivers straight to the pod's ENI, past the node that holds the translation; so such
// flows are source-translated to the node's address (the backend sees it, as with
// kube-proxy in Terway's exclusive mode) and the reply comes back to the node, is restored
// and delivered over veth1. A backend on the pod's own node still sees the pod's address,
// and the pod's direct traffic to the remote backend's address (over its ENI) is untouched.
func TestExclusiveENIPodServicesWithRemoteBackends(t *testing.T) {
	l := upExclusive(t, lab.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := l.Client()
	n0, n1 := l.Node(0), l.Node(1)
	const ns = "exsvc"
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	const tcpPort, udpPort, nodePort = 9090, 9053, 30190
	mk := func(name, app string, typ corev1.ServiceType, np int32) *corev1.Service {
		t.Helper()
		svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{Type: typ, Selector: map[string]string{"app": app}, Ports: []corev1.ServicePort{
				{Name: "tcp", Port: 80, NodePort: np, TargetPort: intstr.FromInt32(tcpPort), Protocol: corev1.ProtocolTCP},
				{Name: "udp", Port: 53, TargetPort: intstr.FromInt32(udpPort), Protocol: corev1.ProtocolUDP}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return svc
	}
	remoteSvc := mk("remote", "remote", corev1.ServiceTypeNodePort, nodePort)
	localSvc := mk("local", "local", corev1.ServiceTypeClusterIP, 0)

	remote, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "remote-be", Node: n1.Name, Labels: map[string]string{"app": "remote"}})
	if err != nil {
		t.Fatal(err)
	}
	local, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "local-be", Node: n0.Name, Labels: map[string]string{"app": "local"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []*lab.Pod{remote, local} {
		serveWho(t, p, tcpPort)
		serveWhoUDP(t, p, udpPort)
	}
	ex, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "ex", Node: n0.Name,
		Annotations: map[string]string{ipam.AnnotationENI: "true"}})
	if err != nil {
		t.Fatal(err)
	}
	checkExclusivePod(t, l, ctx, ex)

	remoteTCP := netip.AddrPortFrom(remote.IP, tcpPort)
	remoteUDP := netip.AddrPortFrom(remote.IP, udpPort)
	vip := func(s *corev1.Service) netip.Addr { return netip.MustParseAddr(s.Spec.ClusterIP) }
	waitBackends(t, n0, netip.AddrPortFrom(vip(remoteSvc), 80), "TCP", remoteTCP)
	waitBackends(t, n0, netip.AddrPortFrom(vip(remoteSvc), 53), "UDP", remoteUDP)
	waitBackends(t, n0, netip.AddrPortFrom(netip.MustParseAddr(n0.PrimaryIP), nodePort), "TCP", remoteTCP)
	waitBackends(t, n0, netip.AddrPortFrom(vip(localSvc), 80), "TCP", netip.AddrPortFrom(local.IP, tcpPort))
	waitBackends(t, n0, netip.AddrPortFrom(vip(localSvc), 53), "UDP", netip.AddrPortFrom(local.IP, udpPort))

	cases := []struct {
		name, proto, addr, who, seen string
	}{
		{"ClusterIP, remote backend", "tcp", net.JoinHostPort(remoteSvc.Spec.ClusterIP, "80"), remote.Name, n0.PrimaryIP},
		{"ClusterIP UDP, remote backend", "udp", net.JoinHostPort(remoteSvc.Spec.ClusterIP, "53"), remote.Name, n0.PrimaryIP},
		{"NodePort on the pod's node, remote backend", "tcp", net.JoinHostPort(n0.PrimaryIP, strconv.Itoa(nodePort)), remote.Name, n0.PrimaryIP},
		{"ClusterIP, backend on the pod's node", "tcp", net.JoinHostPort(localSvc.Spec.ClusterIP, "80"), local.Name, ex.IP.String()},
		{"ClusterIP UDP, backend on the pod's node", "udp", net.JoinHostPort(localSvc.Spec.ClusterIP, "53"), local.Name, ex.IP.String()},
		{"straight to the remote backend over the ENI", "tcp", remoteTCP.String(), remote.Name, ex.IP.String()},
		{"UDP straight to the remote backend over the ENI", "udp", remoteUDP.String(), remote.Name, ex.IP.String()},
	}
	for _, tc := range cases {
		// Several flows each, so a port collision or a lost first packet would show.
		for i := range 5 {
			var who, seen string
			var err error
			if tc.proto == "udp" {
				who, seen, err = askWhoUDP(ctx, ex.NS(), tc.addr, 3*time.Second)
			} else {
				who, seen, err = dialWho(ctx, ex.NS(), tc.addr, 3*time.Second)
			}
			host, _, _ := net.SplitHostPort(seen)
			if err != nil || who != tc.who || host != tc.seen {
				t.Errorf("%s (%s, flow %d): answer %q from %q, %v; want %s seeing %s", tc.name, tc.addr, i, who, seen, err, tc.who, tc.seen)
				break
			}
		}
	}
}
