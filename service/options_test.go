package service

import (
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
)

// richEP is an endpoint with everything kube-proxy looks at.
type richEP struct {
	addr                        string
	ready, serving, terminating *bool
	node                        string
	zones, nodes                []string
}

func richSlice(eps ...richEP) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{eport("http", corev1.ProtocolTCP, 8080)},
	}
	for _, e := range eps {
		ep := discoveryv1.Endpoint{Addresses: []string{e.addr},
			Conditions: discoveryv1.EndpointConditions{Ready: e.ready, Serving: e.serving, Terminating: e.terminating}}
		if e.node != "" {
			ep.NodeName = ptr.To(e.node)
		}
		if len(e.zones) > 0 || len(e.nodes) > 0 {
			ep.Hints = &discoveryv1.EndpointHints{}
			for _, z := range e.zones {
				ep.Hints.ForZones = append(ep.Hints.ForZones, discoveryv1.ForZone{Name: z})
			}
			for _, n := range e.nodes {
				ep.Hints.ForNodes = append(ep.Hints.ForNodes, discoveryv1.ForNode{Name: n})
			}
		}
		s.Endpoints = append(s.Endpoints, ep)
	}
	return s
}

var (
	yes = ptr.To(true)
	no  = ptr.To(false)
)

// The endpoint rules of kube-proxy's CategorizeEndpoints, case by case (pkg/proxy/topology.go
// and its topology_test.go in Kubernetes v1.37).
func TestTranslateEndpointRules(t *testing.T) {
	me := Node{Name: "node-a", Zone: "zone-a"}
	localPolicy := ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
	cases := []struct {
		name     string
		itp      *corev1.ServiceInternalTrafficPolicy
		node     Node
		eps      []richEP
		want     []string
		wantDrop bool
	}{
		{name: "cluster: ready endpoints anywhere", node: me,
			eps:  []richEP{{addr: "10.0.0.1", node: "node-a"}, {addr: "10.0.0.2", node: "node-b"}, {addr: "10.0.0.3", ready: no}},
			want: []string{"10.0.0.1", "10.0.0.2"}},
		{name: "cluster: serving-terminating only when none is ready", node: me,
			eps:  []richEP{{addr: "10.0.0.1", ready: no, serving: yes, terminating: yes}, {addr: "10.0.0.2", ready: no, serving: no, terminating: yes}},
			want: []string{"10.0.0.1"}},
		{name: "cluster: terminating ignored while one is ready", node: me,
			eps:  []richEP{{addr: "10.0.0.1", ready: no, serving: yes, terminating: yes}, {addr: "10.0.0.2"}},
			want: []string{"10.0.0.2"}},
		{name: "cluster: no usable endpoint rejects", node: me,
			eps: []richEP{{addr: "10.0.0.1", ready: no, serving: no}}, want: []string{}},
		{name: "local: only this node's ready endpoints", itp: localPolicy, node: me,
			eps:  []richEP{{addr: "10.0.0.1", node: "node-a"}, {addr: "10.0.0.2", node: "node-b"}},
			want: []string{"10.0.0.1"}},
		{name: "local: none here but some elsewhere drops", itp: localPolicy, node: me,
			eps:  []richEP{{addr: "10.0.0.2", node: "node-b"}},
			want: []string{}, wantDrop: true},
		{name: "local: terminating elsewhere still counts as usable: drop", itp: localPolicy, node: me,
			eps:  []richEP{{addr: "10.0.0.2", node: "node-b", ready: no, serving: yes, terminating: yes}},
			want: []string{}, wantDrop: true},
		{name: "local: no endpoint at all rejects", itp: localPolicy, node: me, want: []string{}},
		{name: "local: local serving-terminating when no local ready", itp: localPolicy, node: me,
			eps:  []richEP{{addr: "10.0.0.1", node: "node-a", ready: no, serving: yes, terminating: yes}, {addr: "10.0.0.2", node: "node-b"}},
			want: []string{"10.0.0.1"}},
		{name: "local: a node without a name has nothing local", itp: localPolicy,
			eps:  []richEP{{addr: "10.0.0.1", node: "node-a"}},
			want: []string{}, wantDrop: true},
		{name: "zone hints for this zone narrow the choice", node: me,
			eps:  []richEP{{addr: "10.0.0.1", zones: []string{"zone-a"}}, {addr: "10.0.0.2", zones: []string{"zone-b"}}},
			want: []string{"10.0.0.1"}},
		{name: "zone hints ignored when one ready endpoint lacks them", node: me,
			eps:  []richEP{{addr: "10.0.0.1", zones: []string{"zone-a"}}, {addr: "10.0.0.2"}},
			want: []string{"10.0.0.1", "10.0.0.2"}},
		{name: "zone hints ignored when none is for this zone", node: me,
			eps:  []richEP{{addr: "10.0.0.1", zones: []string{"zone-b"}}, {addr: "10.0.0.2", zones: []string{"zone-c"}}},
			want: []string{"10.0.0.1", "10.0.0.2"}},
		{name: "zone hints ignored on a node without a zone", node: Node{Name: "node-a"},
			eps:  []richEP{{addr: "10.0.0.1", zones: []string{"zone-a"}}, {addr: "10.0.0.2", zones: []string{"zone-b"}}},
			want: []string{"10.0.0.1", "10.0.0.2"}},
		{name: "hints of not-ready endpoints do not matter", node: me,
			eps:  []richEP{{addr: "10.0.0.1", zones: []string{"zone-a"}}, {addr: "10.0.0.2", zones: []string{"zone-b"}}, {addr: "10.0.0.3", ready: no}},
			want: []string{"10.0.0.1"}},
		{name: "node hints win over zone hints", node: me,
			eps: []richEP{{addr: "10.0.0.1", zones: []string{"zone-a"}, nodes: []string{"node-b"}},
				{addr: "10.0.0.2", zones: []string{"zone-a"}, nodes: []string{"node-a"}}},
			want: []string{"10.0.0.2"}},
		{name: "topology falls back to serving-terminating without hints", node: me,
			eps:  []richEP{{addr: "10.0.0.1", ready: no, serving: yes, terminating: yes, zones: []string{"zone-b"}}},
			want: []string{"10.0.0.1"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := svc("web", []string{"10.96.0.10"}, sport("http", corev1.ProtocolTCP, 80, intstr.FromInt32(8080)))
			s.Spec.InternalTrafficPolicy = c.itp
			st, opts, err := Translator{Node: c.node}.Translate(s, []*discoveryv1.EndpointSlice{richSlice(c.eps...)})
			if err != nil {
				t.Fatal(err)
			}
			f := fe("10.96.0.10", 80, TCP)
			want := []Backend{}
			for _, a := range c.want {
				want = append(want, be(a, 8080))
			}
			if !reflect.DeepEqual(st[f], want) {
				t.Fatalf("backends %v, want %v", st[f], want)
			}
			if opts[f].DropWhenEmpty != c.wantDrop {
				t.Fatalf("DropWhenEmpty %v, want %v", opts[f].DropWhenEmpty, c.wantDrop)
			}
		})
	}
}

func TestTranslateOptions(t *testing.T) {
	eps := []*discoveryv1.EndpointSlice{richSlice(richEP{addr: "10.0.0.1"}, richEP{addr: "10.0.0.2"})}
	f := fe("10.96.0.10", 80, TCP)
	cases := []struct {
		name    string
		tr      Translator
		edit    func(*corev1.Service)
		want    Options
		wantErr bool
	}{
		{name: "defaults", edit: func(*corev1.Service) {}, want: Options{}},
		{name: "ClientIP without config takes 10800 s", edit: func(s *corev1.Service) {
			s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		}, want: Options{AffinitySeconds: 10800}},
		{name: "ClientIP with its timeout", edit: func(s *corev1.Service) {
			s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](60)}}
		}, want: Options{AffinitySeconds: 60}},
		{name: "tern annotation", edit: func(s *corev1.Service) {
			s.Annotations = map[string]string{AnnotationLBAlgorithm: "maglev"}
		}, want: Options{MaglevSize: 251}},
		{name: "Cilium annotation", edit: func(s *corev1.Service) {
			s.Annotations = map[string]string{AnnotationCiliumLBAlgorithm: "Maglev"}
		}, want: Options{MaglevSize: 251}},
		{name: "tern's spelling wins", edit: func(s *corev1.Service) {
			s.Annotations = map[string]string{AnnotationCiliumLBAlgorithm: "maglev", AnnotationLBAlgorithm: "random"}
		}, want: Options{}},
		{name: "node default", tr: Translator{DefaultAlgorithm: AlgorithmMaglev, MaglevTableSize: 16381},
			edit: func(*corev1.Service) {}, want: Options{MaglevSize: 16381}},
		{name: "annotation overrides the node default", tr: Translator{DefaultAlgorithm: AlgorithmMaglev},
			edit: func(s *corev1.Service) { s.Annotations = map[string]string{AnnotationLBAlgorithm: "random"} },
			want: Options{}},
		{name: "unknown algorithm is reported, node default kept", tr: Translator{DefaultAlgorithm: AlgorithmMaglev},
			edit: func(s *corev1.Service) { s.Annotations = map[string]string{AnnotationLBAlgorithm: "roundrobin"} },
			want: Options{MaglevSize: 251}, wantErr: true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := svc("web", []string{"10.96.0.10"}, sport("http", corev1.ProtocolTCP, 80, intstr.FromInt32(8080)))
			c.edit(s)
			st, opts, err := c.tr.Translate(s, eps)
			if (err != nil) != c.wantErr {
				t.Fatalf("error %v, want error %v", err, c.wantErr)
			}
			if len(st[f]) != 2 {
				t.Fatalf("backends %v", st[f])
			}
			if opts[f] != c.want {
				t.Fatalf("options %+v, want %+v", opts[f], c.want)
			}
		})
	}
}

// A change of options alone (affinity switched on) marks the frontend dirty.
func TestBuilderOptionsChangeIsDirty(t *testing.T) {
	b := NewBuilderFor(Translator{Node: Node{Name: "node-a"}})
	s := svc("web", []string{"10.96.0.10"}, sport("http", corev1.ProtocolTCP, 80, intstr.FromInt32(8080)))
	eps := []*discoveryv1.EndpointSlice{richSlice(richEP{addr: "10.0.0.1"})}
	if _, err := b.Set(typesNN("ns", "web"), s, eps); err != nil {
		t.Fatal(err)
	}
	s2 := s.DeepCopy()
	s2.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	dirty, err := b.Set(typesNN("ns", "web"), s2, eps)
	if err != nil {
		t.Fatal(err)
	}
	f := fe("10.96.0.10", 80, TCP)
	if len(dirty) != 1 || dirty[0] != f {
		t.Fatalf("dirty %v, want [%v]", dirty, f)
	}
	if got := b.Options(f); got.AffinitySeconds != DefaultAffinitySeconds {
		t.Fatalf("options %+v", got)
	}
}
