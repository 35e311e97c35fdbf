package service

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
)

// lbService is "web" (port http 80 -> 8080, NodePort 30080) of type LoadBalancer with
// ingress IP 192.0.2.100, externalIP 198.51.100.5 and source ranges.
func lbService(etp corev1.ServiceExternalTrafficPolicy) *corev1.Service {
	s := svc("web", []string{"10.96.0.10"}, sport("http", corev1.ProtocolTCP, 80, intstr.FromInt32(8080)))
	s.Spec.Ports[0].NodePort = 30080
	s.Spec.Type = corev1.ServiceTypeLoadBalancer
	s.Spec.ExternalTrafficPolicy = etp
	s.Spec.ExternalIPs = []string{"198.51.100.5", "fd00::5"}
	s.Spec.LoadBalancerSourceRanges = []string{"203.0.113.0/24", " 10.0.0.7/8", "203.0.113.0/24", "2001:db8::/32"}
	s.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "192.0.2.100"},
		{IP: "192.0.2.101", IPMode: ptr.To(corev1.LoadBalancerIPModeProxy)}, {Hostname: "lb.example"}}
	return s
}

// TestTranslateExternalFrontends: NodePort on every node address, the LoadBalancer IP (not
// the one in Proxy mode) with its canonical source ranges, the externalIP; externalTraffic
// Policy Cluster gives them every endpoint, Local only this node's (terminating ones when
// no local one is ready, drop when none is local) plus an in-cluster twin of each with
// every endpoint; the cluster IP keeps every endpoint.
func TestTranslateExternalFrontends(t *testing.T) {
	me := Node{Name: "node-a", Addrs: []netip.Addr{netip.MustParseAddr("10.0.0.10"), netip.MustParseAddr("10.0.0.20"), netip.MustParseAddr("fd00::10")}}
	tr := Translator{Node: me}
	const ranges = "10.0.0.0/8,203.0.113.0/24"
	node10, node20 := fe("10.0.0.10", 30080, TCP), fe("10.0.0.20", 30080, TCP)
	lb, ext, cip := fe("192.0.2.100", 80, TCP), fe("198.51.100.5", 80, TCP), fe("10.96.0.10", 80, TCP)
	all := []Backend{be("10.0.1.1", 8080), be("10.0.2.1", 8080)}
	local := []Backend{be("10.0.1.1", 8080)}

	cases := []struct {
		name      string
		etp       corev1.ServiceExternalTrafficPolicy
		eps       []richEP
		wantExt   []Backend
		wantDrop  bool
		wantClust []Backend
		exclusive []string // this node's exclusive-ENI pods
	}{
		{name: "Cluster: every endpoint everywhere", etp: corev1.ServiceExternalTrafficPolicyCluster,
			eps:     []richEP{{addr: "10.0.1.1", node: "node-a"}, {addr: "10.0.2.1", node: "node-b"}},
			wantExt: all, wantClust: all},
		{name: "Local: only this node's endpoints outside, all inside", etp: corev1.ServiceExternalTrafficPolicyLocal,
			eps:     []richEP{{addr: "10.0.1.1", node: "node-a"}, {addr: "10.0.2.1", node: "node-b"}},
			wantExt: local, wantClust: all},
		{name: "Local: no local endpoint drops", etp: corev1.ServiceExternalTrafficPolicyLocal,
			eps:     []richEP{{addr: "10.0.2.1", node: "node-b"}},
			wantExt: []Backend{}, wantDrop: true, wantClust: []Backend{be("10.0.2.1", 8080)}},
		{name: "Local: serving-terminating local endpoint when none is ready here", etp: corev1.ServiceExternalTrafficPolicyLocal,
			eps: []richEP{{addr: "10.0.1.1", node: "node-a", ready: no, serving: yes, terminating: yes},
				{addr: "10.0.2.1", node: "node-b"}},
			wantExt: local, wantClust: []Backend{be("10.0.2.1", 8080)}},
		{name: "Cluster: terminating fallback for external frontends too", etp: corev1.ServiceExternalTrafficPolicyCluster,
			eps:     []richEP{{addr: "10.0.1.1", node: "node-a", ready: no, serving: yes, terminating: yes}},
			wantExt: local, wantClust: local},
		{name: "no endpoints at all rejects (no drop flag)", etp: corev1.ServiceExternalTrafficPolicyLocal,
			wantExt: []Backend{}, wantClust: []Backend{}},
		// An exclusive-ENI pod cannot answer with the client's address kept: no Local backend.
		{name: "Local: an exclusive-ENI pod here is no local endpoint", etp: corev1.ServiceExternalTrafficPolicyLocal,
			eps:       []richEP{{addr: "10.0.1.1", node: "node-a"}, {addr: "10.0.2.1", node: "node-b"}},
			exclusive: []string{"10.0.1.1"},
			wantExt:   []Backend{}, wantDrop: true, wantClust: all},
		{name: "Local: an ENIIP pod here beside an exclusive one", etp: corev1.ServiceExternalTrafficPolicyLocal,
			eps:       []richEP{{addr: "10.0.1.1", node: "node-a"}, {addr: "10.0.1.2", node: "node-a"}},
			exclusive: []string{"10.0.1.2"},
			wantExt:   local, wantClust: []Backend{be("10.0.1.1", 8080), be("10.0.1.2", 8080)}},
		{name: "Cluster: an exclusive-ENI pod serves external clients", etp: corev1.ServiceExternalTrafficPolicyCluster,
			eps:       []richEP{{addr: "10.0.1.1", node: "node-a"}, {addr: "10.0.2.1", node: "node-b"}},
			exclusive: []string{"10.0.1.1"},
			wantExt:   all, wantClust: all},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tr := tr
			for _, a := range c.exclusive {
				tr.Node.Exclusive = append(tr.Node.Exclusive, netip.MustParseAddr(a))
			}
			st, opts, err := tr.Translate(lbService(c.etp), []*discoveryv1.EndpointSlice{richSlice(c.eps...)})
			if err != nil {
				t.Fatal(err)
			}
			want := State{cip: c.wantClust, node10: c.wantExt, node20: c.wantExt, lb: c.wantExt, ext: c.wantExt}
			isLocal := c.etp == corev1.ServiceExternalTrafficPolicyLocal
			wantOpts := map[Frontend]Options{
				cip:    {},
				node10: {Kind: KindNodePort, DropWhenEmpty: c.wantDrop, ExternalLocal: isLocal},
				node20: {Kind: KindNodePort, DropWhenEmpty: c.wantDrop, ExternalLocal: isLocal},
				lb:     {Kind: KindLoadBalancer, DropWhenEmpty: c.wantDrop, SourceRanges: ranges, ExternalLocal: isLocal},
				ext:    {Kind: KindExternalIP, DropWhenEmpty: c.wantDrop, ExternalLocal: isLocal},
			}
			if isLocal {
				// In-cluster clients get the cluster endpoints at the same addresses.
				for _, f := range []Frontend{node10, node20, lb, ext} {
					twin := f
					twin.Internal = true
					want[twin] = c.wantClust
					o := wantOpts[f]
					o.DropWhenEmpty, o.ExternalLocal = false, false
					wantOpts[twin] = o
				}
			}
			if !reflect.DeepEqual(st, want) {
				t.Fatalf("state\n got %v\nwant %v", st, want)
			}
			if !reflect.DeepEqual(opts, wantOpts) {
				t.Fatalf("options\n got %v\nwant %v", opts, wantOpts)
			}
		})
	}
}

// TestTranslateExternalByType: a ClusterIP Service has no NodePort frontends even with a
// nodePort number, but keeps its externalIPs; a NodePort Service has no LoadBalancer IP.
func TestTranslateExternalByType(t *testing.T) {
	tr := Translator{Node: Node{Name: "node-a", Addrs: []netip.Addr{netip.MustParseAddr("10.0.0.10")}}}
	for _, c := range []struct {
		typ  corev1.ServiceType
		want []Frontend
	}{
		{corev1.ServiceTypeClusterIP, []Frontend{fe("10.96.0.10", 80, TCP), fe("198.51.100.5", 80, TCP)}},
		{corev1.ServiceTypeNodePort, []Frontend{fe("10.96.0.10", 80, TCP), fe("198.51.100.5", 80, TCP), fe("10.0.0.10", 30080, TCP)}},
		{corev1.ServiceTypeLoadBalancer, []Frontend{fe("10.96.0.10", 80, TCP), fe("198.51.100.5", 80, TCP), fe("10.0.0.10", 30080, TCP), fe("192.0.2.100", 80, TCP)}},
	} {
		s := lbService(corev1.ServiceExternalTrafficPolicyCluster)
		s.Spec.Type = c.typ
		st, _, err := tr.Translate(s, nil)
		if err != nil {
			t.Fatal(err)
		}
		if len(st) != len(c.want) {
			t.Fatalf("%s: frontends %v, want %v", c.typ, st, c.want)
		}
		for _, f := range c.want {
			if _, ok := st[f]; !ok {
				t.Fatalf("%s: frontend %s missing from %v", c.typ, f, st)
			}
		}
	}
}

// TestServiceAddressesThatAreNotUnicast: a cluster IP, LoadBalancer ingress IP or externalIP
// that is unspecified, loopback, multicast or reserved gets no frontend (it would capture the
// node's own connections to itself) and an error naming it; the Service's good addresses
// keep theirs.
func TestServiceAddressesThatAreNotUnicast(t *testing.T) {
	tr := Translator{Node: Node{Name: "node-a"}}
	s := lbService(corev1.ServiceExternalTrafficPolicyCluster)
	s.Spec.Type = corev1.ServiceTypeClusterIP
	s.Spec.ClusterIP, s.Spec.ClusterIPs = "0.0.0.0", []string{"0.0.0.0"}
	s.Spec.ExternalIPs = []string{"127.0.0.1", "198.51.100.5", "224.0.0.9", "255.255.255.255"}
	st, _, err := tr.Translate(s, nil)
	if want := (State{fe("198.51.100.5", 80, TCP): []Backend{}}); !reflect.DeepEqual(st, want) {
		t.Fatalf("state %v, want only the unicast externalIP's frontend %v", st, want)
	}
	for _, bad := range []string{"cluster IP 0.0.0.0", "external IP 127.0.0.1", "external IP 224.0.0.9", "external IP 255.255.255.255"} {
		if err == nil || !strings.Contains(err.Error(), bad+" is not a unicast address") {
			t.Errorf("error %v does not name %s", err, bad)
		}
	}

	s = lbService(corev1.ServiceExternalTrafficPolicyCluster)
	s.Spec.ExternalIPs = nil
	s.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "127.0.0.53"}, {IP: "192.0.2.100"}}
	st, _, err = tr.Translate(s, nil)
	if _, ok := st[fe("127.0.0.53", 80, TCP)]; ok || err == nil || !strings.Contains(err.Error(), "load balancer ingress IP 127.0.0.53 is not a unicast address") {
		t.Fatalf("a loopback LoadBalancer IP: state %v, error %v; want no frontend and an error naming it", st, err)
	}
	if _, ok := st[fe("192.0.2.100", 80, TCP)]; !ok {
		t.Fatalf("the good LoadBalancer IP lost its frontend: %v", st)
	}
}

// TestSourceRangesCanonical: bad and IPv6-only ranges never open a restricted Service.
func TestSourceRangesCanonical(t *testing.T) {
	for _, c := range []struct {
		in      []string
		want    string
		wantErr bool
	}{
		{nil, "", false},
		{[]string{"10.1.2.3/16", "10.1.0.0/16"}, "10.1.0.0/16", false},
		{[]string{"2001:db8::/32"}, "0.0.0.0/32", false},
		{[]string{"nonsense"}, "0.0.0.0/32", true},
		{[]string{"nonsense", "192.0.2.0/24"}, "192.0.2.0/24", true},
	} {
		got, err := canonicalRanges(c.in)
		if got != c.want || (err != nil) != c.wantErr {
			t.Errorf("canonicalRanges(%q) = %q, %v; want %q, error %v", c.in, got, err, c.want, c.wantErr)
		}
	}
	o := Options{SourceRanges: "10.0.0.0/8,203.0.113.0/24"}
	if got := o.Prefixes(); len(got) != 2 || got[1] != netip.MustParsePrefix("203.0.113.0/24") {
		t.Fatalf("Prefixes() = %v", got)
	}
}
