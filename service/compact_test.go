package service

import (
	"net/netip"
	"reflect"
	"testing"
	"unsafe"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
)

// oracleTranslators are the node views the oracle comparison runs with: none, a node with
// local endpoints, addresses and a zone, and Maglev as the node default with a fixed size.
var oracleTranslators = []Translator{
	{},
	{Node: Node{Name: "node-a", Zone: "zone-a", Addrs: []netip.Addr{netip.MustParseAddr("192.168.0.5"), netip.MustParseAddr("fd00::5")}}},
	{Node: Node{Name: "node-b", Zone: "zone-b", Addrs: []netip.Addr{netip.MustParseAddr("192.168.0.6")}},
		DefaultAlgorithm: AlgorithmMaglev, MaglevTableSize: 251},
}

// sameAsAPI fails unless the compact copies of svc and eps (made by one shared Compactor,
// as the controller does) translate to exactly what main's translation of the API objects
// gave (refTranslate), error text included, for every oracle translator.
func sameAsAPI(t *testing.T, c *Compactor, svc *corev1.Service, eps []*discoveryv1.EndpointSlice) {
	t.Helper()
	cs := make([]*Slice, len(eps))
	for i, e := range eps {
		cs[i] = c.Slice(e)
	}
	csvc := c.Service(svc)
	for _, tr := range oracleTranslators {
		wantSt, wantOpts, wantErr := tr.refTranslate(svc, eps)
		gotSt, gotOpts, gotErr := tr.TranslateCompact(csvc, cs)
		if !reflect.DeepEqual(gotSt, wantSt) || !reflect.DeepEqual(gotOpts, wantOpts) || errText(gotErr) != errText(wantErr) {
			t.Fatalf("node %q: compact translation differs from the API objects':\n got %v %v %q\nwant %v %v %q",
				tr.Node.Name, gotSt, gotOpts, errText(gotErr), wantSt, wantOpts, errText(wantErr))
		}
	}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// TestCompactTranslatesAsAPI: Services and slices using every field translation reads, and
// the malformed ones it must report, translate identically from their compact copies.
func TestCompactTranslatesAsAPI(t *testing.T) {
	c := NewCompactor()
	lb := lbService(corev1.ServiceExternalTrafficPolicyLocal)
	lb.Annotations = map[string]string{AnnotationLBAlgorithm: "bogus", AnnotationCiliumLBAlgorithm: "maglev"}
	lb.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	lb.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](0)}}
	lb.Spec.LoadBalancerSourceRanges = []string{"198.51.100.7/24", "2001:db8::/32", "nonsense"}
	lb.Spec.ExternalIPs = append(lb.Spec.ExternalIPs, "fd00::7", "300.1.1.1")
	lb.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
	lb.Spec.HealthCheckNodePort, lb.UID = 31000, "u-1"
	lb.Status.LoadBalancer.Ingress = append(lb.Status.LoadBalancer.Ingress,
		corev1.LoadBalancerIngress{IP: "203.0.113.99", IPMode: ptr.To(corev1.LoadBalancerIPModeProxy)},
		corev1.LoadBalancerIngress{Hostname: "lb.example"}, corev1.LoadBalancerIngress{IP: "bad"})
	lb.Spec.Ports = append(lb.Spec.Ports, sport("sctp", corev1.ProtocolSCTP, 9, intstr.FromInt32(9)),
		sport("icmp", "ICMP", 1, intstr.FromInt32(1)), sport("big", corev1.ProtocolTCP, 70000, intstr.FromInt32(1)),
		corev1.ServicePort{Name: "np", Port: 81, NodePort: 70000})

	hint := func(zones, nodes []string) *discoveryv1.EndpointHints {
		h := &discoveryv1.EndpointHints{}
		for _, z := range zones {
			h.ForZones = append(h.ForZones, discoveryv1.ForZone{Name: z})
		}
		for _, n := range nodes {
			h.ForNodes = append(h.ForNodes, discoveryv1.ForNode{Name: n})
		}
		return h
	}
	e := func(addrs []string, node string, ready, serving, term *bool, h *discoveryv1.EndpointHints) discoveryv1.Endpoint {
		out := discoveryv1.Endpoint{Addresses: addrs, Hints: h,
			Conditions: discoveryv1.EndpointConditions{Ready: ready, Serving: serving, Terminating: term}}
		if node != "" {
			out.NodeName = ptr.To(node)
		}
		return out
	}
	yes, no := ptr.To(true), ptr.To(false)
	var ports []discoveryv1.EndpointPort
	for _, p := range lb.Spec.Ports {
		ports = append(ports, eport(p.Name, p.Protocol, 8000+p.Port%1000))
	}
	ports = append(ports, discoveryv1.EndpointPort{Name: ptr.To("http")}, // no number
		discoveryv1.EndpointPort{Name: ptr.To("http"), Protocol: ptr.To(corev1.Protocol("")), Port: ptr.To[int32](7)},
		discoveryv1.EndpointPort{Port: ptr.To[int32](99999)})
	sl := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "a",
		Labels: map[string]string{discoveryv1.LabelServiceName: lb.Name}}, AddressType: discoveryv1.AddressTypeIPv4, Ports: ports,
		Endpoints: []discoveryv1.Endpoint{
			e([]string{"10.0.0.1"}, "node-a", yes, yes, no, hint([]string{"zone-a"}, []string{"node-a"})),
			e([]string{"10.0.0.2", "10.0.0.12", "127.0.0.1", "fd00::2", "x"}, "node-b", nil, nil, nil, hint([]string{"zone-b"}, nil)),
			e([]string{"10.0.0.3"}, "node-a", no, yes, yes, nil),
			e([]string{"10.0.0.4"}, "", no, no, no, nil),
			e(nil, "node-a", yes, nil, nil, nil),
			e([]string{"224.0.0.1", "0.0.0.0", "255.255.255.255"}, "node-b", yes, yes, no, nil),
		}}
	v6 := &discoveryv1.EndpointSlice{ObjectMeta: sl.ObjectMeta, AddressType: discoveryv1.AddressTypeIPv6, Ports: ports,
		Endpoints: []discoveryv1.Endpoint{e([]string{"fd00::1"}, "node-a", yes, yes, no, nil)}}
	sameAsAPI(t, c, lb, []*discoveryv1.EndpointSlice{sl, v6})
	cluster := lb.DeepCopy()
	cluster.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyCluster
	cluster.Spec.InternalTrafficPolicy = nil
	cluster.Spec.SessionAffinityConfig.ClientIP.TimeoutSeconds = ptr.To[int32](60)
	sameAsAPI(t, c, cluster, []*discoveryv1.EndpointSlice{sl})

	for name, mod := range map[string]func(*corev1.Service){
		"headless after a bad IP": func(s *corev1.Service) { s.Spec.ClusterIPs = []string{"bad", corev1.ClusterIPNone} },
		"external name":           func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeExternalName },
		"node port":               func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeNodePort },
		"cluster IP only":         func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeClusterIP },
		"dual stack, bad v4":      func(s *corev1.Service) { s.Spec.ClusterIPs = []string{"fd00::10", "10.96.0.300", "10.96.0.11"} },
		"clusterIP field only":    func(s *corev1.Service) { s.Spec.ClusterIPs, s.Spec.ClusterIP = nil, "10.96.0.12" },
		"only IPv6 ranges":        func(s *corev1.Service) { s.Spec.LoadBalancerSourceRanges = []string{"2001:db8::/32"} },
	} {
		s := lb.DeepCopy()
		mod(s)
		t.Run(name, func(t *testing.T) { sameAsAPI(t, c, s, []*discoveryv1.EndpointSlice{sl}) })
	}

	// Shared: the namespace and node names repeat across objects; one copy each.
	a, b := c.Slice(sl), c.Slice(sl.DeepCopy())
	if unsafe.StringData(a.Namespace) != unsafe.StringData(b.Namespace) ||
		unsafe.StringData(a.Endpoints[1].Node) != unsafe.StringData(b.Endpoints[5].Node) {
		t.Error("repeated namespaces and node names are separate copies")
	}
	if got := c.Service(lb); got.HealthCheckNodePort != uint16(lb.Spec.HealthCheckNodePort) || got.Ref().UID != lb.UID {
		t.Errorf("health check port %d, Event reference %+v", got.HealthCheckNodePort, got.Ref())
	}
}
