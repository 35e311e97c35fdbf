package controller

import (
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// keptAnnotationPrefixes are the Service annotations the cache keeps: the ones service
// translation reads (service.tern.io/lb-algorithm, Cilium's service.cilium.io/ spellings),
// Terway's k8s.aliyun.com/ and Kubernetes' own service.kubernetes.io/. Cloud load-balancer
// annotations (service.beta.kubernetes.io/alibaba-cloud-loadbalancer-*, a dozen on some
// Services) and kubectl's last-applied copy are dropped. An annotation tern starts to read
// must have one of these prefixes, or be added here: TestSlimKeepsWhatTranslationReads fails
// otherwise for the ones it knows.
var keptAnnotationPrefixes = []string{"service.tern.io/", "service.cilium.io/", "k8s.aliyun.com/", "service.kubernetes.io/"}

// slimmer turns the Services and EndpointSlices the informers decode into copies holding
// only what the controller, the translator and the health-check servers read, before they
// enter the caches: at 10,000 Services the caches are most of the agent's memory, and most of
// an object is what other controllers need (a slice endpoint's pod reference, owner
// references, selectors, managedFields, kubectl's copy of the whole object). It also shares
// one copy of the values that repeat across endpoints (node names, zones, the condition
// booleans) instead of one per endpoint.
//
// The copies are the same API types with fields left empty, so everything downstream is
// unchanged; they are read-only, as every informer cache object is. One slimmer serves both
// informers, whose transforms run on their own goroutines, hence the lock.
type slimmer struct {
	mu          sync.Mutex
	strs        map[string]*string
	yes, no     *bool
	maxInterned int
}

func newSlimmer() *slimmer {
	t, f := true, false
	// Node names and zones are a few hundred at most; the bound only keeps a misbehaving
	// writer (random node names) from growing the table without limit.
	return &slimmer{strs: map[string]*string{}, yes: &t, no: &f, maxInterned: 1 << 16}
}

// transform is the informers' cache.TransformFunc. Tombstones and other types pass as they are.
func (s *slimmer) transform(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Service:
		return s.service(o), nil
	case *discoveryv1.EndpointSlice:
		return s.slice(o), nil
	}
	return obj, nil
}

func slimMeta(m *metav1.ObjectMeta) metav1.ObjectMeta {
	// UID and ResourceVersion: Events on the object (Recorder) name them.
	return metav1.ObjectMeta{Name: m.Name, Namespace: m.Namespace, UID: m.UID,
		ResourceVersion: m.ResourceVersion, Generation: m.Generation,
		CreationTimestamp: m.CreationTimestamp, DeletionTimestamp: m.DeletionTimestamp}
}

func (s *slimmer) service(o *corev1.Service) *corev1.Service {
	out := &corev1.Service{ObjectMeta: slimMeta(&o.ObjectMeta), Spec: o.Spec,
		Status: corev1.ServiceStatus{LoadBalancer: o.Status.LoadBalancer}}
	out.Spec.Selector = nil // the pods' selector: the EndpointSlice controller's business
	if len(o.Spec.ClusterIPs) > 0 && o.Spec.ClusterIPs[0] == o.Spec.ClusterIP {
		out.Spec.ClusterIP = o.Spec.ClusterIPs[0] // one string, not two equal ones
	}
	out.Annotations = keepPrefixed(o.Annotations)
	out.Labels = keepPrefixed(o.Labels)
	return out
}

func keepPrefixed(m map[string]string) map[string]string {
	var out map[string]string
	for k, v := range m {
		if k == corev1.LastAppliedConfigAnnotation {
			continue
		}
		for _, p := range keptAnnotationPrefixes {
			if strings.HasPrefix(k, p) {
				if out == nil {
					out = map[string]string{}
				}
				out[k] = v
				break
			}
		}
	}
	return out
}

func (s *slimmer) slice(o *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
	out := &discoveryv1.EndpointSlice{ObjectMeta: slimMeta(&o.ObjectMeta), AddressType: o.AddressType, Ports: o.Ports}
	if name, ok := o.Labels[discoveryv1.LabelServiceName]; ok {
		out.Labels = map[string]string{discoveryv1.LabelServiceName: name}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	out.Endpoints = make([]discoveryv1.Endpoint, len(o.Endpoints))
	for i := range o.Endpoints {
		e := &o.Endpoints[i]
		// Hostname, the pod reference and the deprecated topology map are left out.
		out.Endpoints[i] = discoveryv1.Endpoint{Addresses: e.Addresses, Hints: e.Hints,
			NodeName: s.str(e.NodeName), Zone: s.str(e.Zone),
			Conditions: discoveryv1.EndpointConditions{Ready: s.bool(e.Conditions.Ready),
				Serving: s.bool(e.Conditions.Serving), Terminating: s.bool(e.Conditions.Terminating)}}
	}
	return out
}

func (s *slimmer) bool(b *bool) *bool {
	switch {
	case b == nil:
		return nil
	case *b:
		return s.yes
	default:
		return s.no
	}
}

func (s *slimmer) str(p *string) *string {
	if p == nil {
		return nil
	}
	if q, ok := s.strs[*p]; ok {
		return q
	}
	if len(s.strs) >= s.maxInterned {
		return p
	}
	s.strs[*p] = p
	return p
}
