package healthcheck

import (
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync/atomic"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	"github.com/tern-net/tern/service"
)

func freePort(t *testing.T) uint16 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return uint16(l.Addr().(*net.TCPAddr).Port)
}

// The answers of kube-proxy's service health server: 200 with local endpoints, 503
// without them or when the proxy is unhealthy; its headers; its body byte for byte (as
// its dedented template renders, checked against lithammer/dedent); nothing listening once
// the Service no longer needs a check.
func TestHealthCheckAnswersAsKubeProxy(t *testing.T) {
	var healthy atomic.Bool
	healthy.Store(true)
	s := New([]netip.Addr{netip.MustParseAddr("127.0.0.1")}, healthy.Load, nil)
	t.Cleanup(s.Close)
	nn := types.NamespacedName{Namespace: "shop", Name: "web"}
	port := freePort(t)
	url := "http://" + netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port).String() + "/healthz"

	get := func() (int, http.Header, string) {
		t.Helper()
		resp, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header, string(b)
	}
	for _, c := range []struct {
		endpoints int
		healthy   bool
		code      int
		body      string
	}{
		{2, true, 200, "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"},
		{0, true, 503, "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 0,\n\t\"serviceProxyHealthy\": true\n}"},
		{1, false, 503, "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": false\n}"},
	} {
		healthy.Store(c.healthy)
		if err := s.Update(nn, port, c.endpoints); err != nil {
			t.Fatal(err)
		}
		code, h, body := get()
		if code != c.code || body != c.body {
			t.Fatalf("%d endpoints, healthy %v: %d %q, want %d %q", c.endpoints, c.healthy, code, body, c.code, c.body)
		}
		if h.Get("Content-Type") != "application/json" || h.Get("X-Content-Type-Options") != "nosniff" ||
			h.Get("X-Load-Balancing-Endpoint-Weight") != strconv.Itoa(c.endpoints) {
			t.Fatalf("headers %v", h)
		}
	}
	if err := s.Update(nn, 0, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := http.Get(url); err == nil {
		t.Fatal("the health check still answers after the Service stopped needing it")
	}
	if len(s.Ports()) != 0 {
		t.Fatalf("ports left: %v", s.Ports())
	}
}

// Which Services get a check, and what counts as a local endpoint.
func TestPortAndLocalEndpoints(t *testing.T) {
	svc := &corev1.Service{Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer,
		ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal, HealthCheckNodePort: 32000}}
	if Port(svc) != 32000 {
		t.Fatalf("Port = %d, want 32000", Port(svc))
	}
	cl := svc.DeepCopy()
	cl.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyCluster
	np := svc.DeepCopy()
	np.Spec.Type = corev1.ServiceTypeNodePort
	if Port(cl) != 0 || Port(np) != 0 {
		t.Fatal("only LoadBalancer Services with externalTrafficPolicy Local get a check")
	}
	ep := func(addr, node string, ready bool) discoveryv1.Endpoint {
		return discoveryv1.Endpoint{Addresses: []string{addr}, NodeName: ptr.To(node),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(ready), Serving: ptr.To(true), Terminating: ptr.To(!ready)}}
	}
	eps := []*discoveryv1.EndpointSlice{
		{AddressType: discoveryv1.AddressTypeIPv4, Endpoints: []discoveryv1.Endpoint{
			ep("10.0.1.1", "me", true), ep("10.0.1.2", "me", false), ep("10.0.2.1", "other", true)}},
		// The same address in another slice (another port) counts once.
		{AddressType: discoveryv1.AddressTypeIPv4, Endpoints: []discoveryv1.Endpoint{ep("10.0.1.1", "me", true), ep("10.0.1.3", "me", true)}},
	}
	if n := LocalReadyEndpoints("me", eps); n != 2 {
		t.Fatalf("LocalReadyEndpoints = %d, want 2 (ready, local, distinct)", n)
	}
	// This node's exclusive-ENI pods serve no eTP Local frontend: left out and counted (an
	// address of another node or a terminating one is not counted as left out).
	except := []netip.Addr{netip.MustParseAddr("10.0.1.3"), netip.MustParseAddr("10.0.1.2"), netip.MustParseAddr("10.0.2.1")}
	if n, left := LocalReadyExcept("me", service.CompactSlices(eps), except); n != 1 || left != 1 {
		t.Fatalf("LocalReadyExcept = %d, %d left out; want 1, 1", n, left)
	}
}
