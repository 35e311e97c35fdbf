package controller

import (
	"net/netip"
	"reflect"
	"testing"

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

// TestSlimKeepsWhatTranslationReads: the slimmed Service and slices translate to exactly
// the frontends, backends and options of the originals, for a node with local endpoints and
// a zone, and the health-check servers count the same local endpoints; what the cache drops
// is gone, and repeated values share one copy.
func TestSlimKeepsWhatTranslationReads(t *testing.T) {
	tr := service.Translator{Node: service.Node{Name: "node-a", Zone: "zone-a",
		Addrs: []netip.Addr{netip.MustParseAddr("192.168.0.5")}}}
	s := newSlimmer()
	svc := richService()
	eps := []*discoveryv1.EndpointSlice{richSlice("web-1", "node-a"), richSlice("web-2", "node-a")}
	eps[1].Endpoints = eps[1].Endpoints[1:2]
	wantState, wantOpts, wantErr := tr.Translate(svc, eps)
	if len(wantState) == 0 {
		t.Fatal("the fixture translates to nothing")
	}
	slimSvcAny, _ := s.transform(svc.DeepCopy())
	slimSvc := slimSvcAny.(*corev1.Service)
	var slimEps []*discoveryv1.EndpointSlice
	for _, e := range eps {
		o, _ := s.transform(e.DeepCopy())
		slimEps = append(slimEps, o.(*discoveryv1.EndpointSlice))
	}
	gotState, gotOpts, gotErr := tr.Translate(slimSvc, slimEps)
	if !reflect.DeepEqual(gotState, wantState) || !reflect.DeepEqual(gotOpts, wantOpts) || (gotErr == nil) != (wantErr == nil) {
		t.Errorf("slimmed objects translate differently:\n got %v %v %v\nwant %v %v %v", gotState, gotOpts, gotErr, wantState, wantOpts, wantErr)
	}
	if g, w := healthcheck.LocalReadyEndpoints("node-a", slimEps), healthcheck.LocalReadyEndpoints("node-a", eps); g != w || w == 0 {
		t.Errorf("local ready endpoints: slim %d, original %d (want equal, non-zero)", g, w)
	}
	if g, w := healthcheck.Port(slimSvc), healthcheck.Port(svc); g != w || w == 0 {
		t.Errorf("health check port: slim %d, original %d", g, w)
	}
	if nn, ok := serviceKeyOf(slimEps[0]); !ok || nn.Name != "web" || nn.Namespace != "shop" {
		t.Errorf("slim slice's Service: %v %v", nn, ok)
	}
	if slimSvc.UID != "u-1" || slimSvc.ResourceVersion != "42" {
		t.Errorf("Events need the Service's UID and resourceVersion: %q %q", slimSvc.UID, slimSvc.ResourceVersion)
	}

	// Dropped.
	if slimSvc.ManagedFields != nil || slimSvc.OwnerReferences != nil || slimSvc.Spec.Selector != nil || slimSvc.Status.Conditions != nil {
		t.Errorf("slim Service kept managedFields, owners, selector or conditions: %+v", slimSvc)
	}
	wantAnn := map[string]string{service.AnnotationCiliumLBAlgorithm: "maglev"}
	if !reflect.DeepEqual(slimSvc.Annotations, wantAnn) {
		t.Errorf("slim Service annotations %v, want %v", slimSvc.Annotations, wantAnn)
	}
	if !reflect.DeepEqual(slimSvc.Labels, map[string]string{"service.kubernetes.io/service-proxy-name": "tern"}) {
		t.Errorf("slim Service labels %v", slimSvc.Labels)
	}
	e0 := slimEps[0].Endpoints[0]
	if e0.TargetRef != nil || e0.Hostname != nil || slimEps[0].Annotations != nil || len(slimEps[0].Labels) != 1 {
		t.Errorf("slim slice kept the pod reference, hostname, annotations or other labels: %+v %v", e0, slimEps[0].ObjectMeta)
	}
	// Shared.
	e2 := slimEps[0].Endpoints[2]
	if e0.NodeName != e2.NodeName || e0.Zone != e2.Zone || e0.Conditions.Ready != slimEps[1].Endpoints[0].Conditions.Ready {
		t.Error("repeated node names, zones and conditions are separate copies")
	}

	// A tombstone and other types pass untouched.
	tomb := cache.DeletedFinalStateUnknown{Key: "shop/web", Obj: svc}
	if out, err := s.transform(tomb); err != nil || !reflect.DeepEqual(out, any(tomb)) {
		t.Errorf("tombstone: %v, %v", out, err)
	}
}
