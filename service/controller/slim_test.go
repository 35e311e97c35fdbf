package controller

import (
	"net/netip"
	"reflect"
	"testing"
	"unsafe"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"

	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/healthcheck"
)

// richService uses every field translation reads: cluster IPs, ports, NodePort and
// LoadBalancer addresses, externalIPs, source ranges, both traffic policies, ClientIP
// affinity, the algorithm annotation, healthCheckNodePort; plus what the cache drops.
func richService() *corev1.Service {
	mf := []metav1.ManagedFieldsEntry{{Manager: "kubectl", Operation: metav1.ManagedFieldsOperationApply}}
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop", UID: "u-1", ResourceVersion: "42",
			ManagedFields: mf, Labels: map[string]string{"app": "web", "service.kubernetes.io/service-proxy-name": "tern"},
			OwnerReferences: []metav1.OwnerReference{{Kind: "Deployment", Name: "web"}},
			Annotations: map[string]string{corev1.LastAppliedConfigAnnotation: "{...}",
				service.AnnotationCiliumLBAlgorithm:                          "maglev",
				"service.beta.kubernetes.io/alibaba-cloud-loadbalancer-spec": "slb.s1.small"}},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeLoadBalancer, ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10"},
			Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{
				{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromString("http"), NodePort: 30080},
				{Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53, TargetPort: intstr.FromInt32(5353), NodePort: 30053},
			},
			ExternalIPs:              []string{"192.0.2.7"},
			LoadBalancerSourceRanges: []string{"198.51.100.0/24"},
			ExternalTrafficPolicy:    corev1.ServiceExternalTrafficPolicyLocal,
			InternalTrafficPolicy:    ptr.To(corev1.ServiceInternalTrafficPolicyCluster),
			HealthCheckNodePort:      31000,
			SessionAffinity:          corev1.ServiceAffinityClientIP,
			SessionAffinityConfig:    &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](600)}},
		},
		Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: []corev1.LoadBalancerIngress{{IP: "203.0.113.9"}}},
			Conditions: []metav1.Condition{{Type: "Ready", Status: metav1.ConditionTrue}}},
	}
}

func richSlice(name string, node0 string) *discoveryv1.EndpointSlice {
	ep := func(ip, node, zone string, ready, serving, terminating bool) discoveryv1.Endpoint {
		return discoveryv1.Endpoint{Addresses: []string{ip}, NodeName: ptr.To(node), Zone: ptr.To(zone),
			Hostname:   ptr.To("h-" + ip),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(ready), Serving: ptr.To(serving), Terminating: ptr.To(terminating)},
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: "shop", Name: "web-" + ip, UID: "pod-uid"},
			Hints:      &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: zone}}}}
	}
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop", UID: "s-1",
			Labels:      map[string]string{discoveryv1.LabelServiceName: "web", discoveryv1.LabelManagedBy: "endpointslice-controller.k8s.io"},
			Annotations: map[string]string{corev1.EndpointsLastChangeTriggerTime: "2026-12-03T10:00:00Z"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports: []discoveryv1.EndpointPort{{Name: ptr.To("http"), Protocol: ptr.To(corev1.ProtocolTCP), Port: ptr.To[int32](8080)},
			{Name: ptr.To("dns"), Protocol: ptr.To(corev1.ProtocolUDP), Port: ptr.To[int32](5353)}},
		Endpoints: []discoveryv1.Endpoint{
			ep("10.0.0.1", node0, "zone-a", true, true, false),
			ep("10.0.0.2", "node-b", "zone-b", true, true, false),
			ep("10.0.0.3", node0, "zone-a", false, true, true),
			ep("10.0.0.4", "node-c", "zone-a", false, false, false),
		},
	}
}

// TestCompactKeepsWhatTranslationReads: the informers' transform turns the Service and
// slices into compact structs that translate to exactly the frontends, backends and options
// of the originals, for a node with local endpoints and a zone, and the health-check servers
// count the same local endpoints and serve the same port; what the cache drops is gone, and
// repeated values share one copy. (service.TestCompactTranslatesAsAPI compares with main's
// translation of API objects field by field, malformed ones included.)
func TestCompactKeepsWhatTranslationReads(t *testing.T) {
	tr := service.Translator{Node: service.Node{Name: "node-a", Zone: "zone-a",
		Addrs: []netip.Addr{netip.MustParseAddr("192.168.0.5")}}}
	cp := newCompacter()
	svc := richService()
	eps := []*discoveryv1.EndpointSlice{richSlice("web-1", "node-a"), richSlice("web-2", "node-a")}
	eps[1].Endpoints = eps[1].Endpoints[1:2]
	wantState, wantOpts, wantErr := tr.Translate(svc, eps)
	if len(wantState) == 0 {
		t.Fatal("the fixture translates to nothing")
	}
	csvcAny, _ := cp.transform(svc.DeepCopy())
	csvc := csvcAny.(*service.Service)
	var ceps []*service.Slice
	for _, e := range eps {
		o, _ := cp.transform(e.DeepCopy())
		ceps = append(ceps, o.(*service.Slice))
	}
	gotState, gotOpts, gotErr := tr.TranslateCompact(csvc, ceps)
	if !reflect.DeepEqual(gotState, wantState) || !reflect.DeepEqual(gotOpts, wantOpts) || (gotErr == nil) != (wantErr == nil) {
		t.Errorf("compact objects translate differently:\n got %v %v %v\nwant %v %v %v", gotState, gotOpts, gotErr, wantState, wantOpts, wantErr)
	}
	if g, w := healthcheck.LocalReady("node-a", ceps), healthcheck.LocalReadyEndpoints("node-a", eps); g != w || w == 0 {
		t.Errorf("local ready endpoints: compact %d, original %d (want equal, non-zero)", g, w)
	}
	if g, w := healthcheck.PortOf(csvc), healthcheck.Port(svc); g != w || w == 0 {
		t.Errorf("health check port: compact %d, original %d", g, w)
	}
	if nn, ok := serviceKeyOf(ceps[0]); !ok || nn.Name != "web" || nn.Namespace != "shop" {
		t.Errorf("compact slice's Service: %v %v", nn, ok)
	}
	if keys, _ := sliceServiceKey(ceps[0]); !reflect.DeepEqual(keys, []string{"shop/web"}) {
		t.Errorf("slice index keys %v", keys)
	}
	// The informer stores key objects with this; Events name the Service with Ref.
	if k, err := cache.MetaNamespaceKeyFunc(csvc); err != nil || k != "shop/web" {
		t.Errorf("store key of a compact Service: %q %v", k, err)
	}
	if k, err := cache.MetaNamespaceKeyFunc(ceps[0]); err != nil || k != "shop/web-1" {
		t.Errorf("store key of a compact slice: %q %v", k, err)
	}
	if r := csvc.Ref(); r.UID != "u-1" || r.ResourceVersion != "42" || r.Kind != "Service" || r.Name != "web" {
		t.Errorf("Events need the Service's kind, name, UID and resourceVersion: %+v", r)
	}
	// Shared.
	e0, e2 := ceps[0].Endpoints[0], ceps[0].Endpoints[2]
	if unsafe.StringData(e0.Node) != unsafe.StringData(e2.Node) || unsafe.StringData(ceps[0].Namespace) != unsafe.StringData(csvc.Namespace) {
		t.Error("repeated node names and namespaces are separate copies")
	}

	// A tombstone and other types pass untouched.
	tomb := cache.DeletedFinalStateUnknown{Key: "shop/web", Obj: csvc}
	if out, err := cp.transform(tomb); err != nil || !reflect.DeepEqual(out, any(tomb)) {
		t.Errorf("tombstone: %v, %v", out, err)
	}
	if nn, ok := serviceKeyOf(tomb); !ok || nn.Name != "web" {
		t.Errorf("tombstone's Service: %v %v", nn, ok)
	}
}
