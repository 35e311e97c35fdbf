package service

import (
	"net/netip"
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
)

func svc(name string, ips []string, ports ...corev1.ServicePort) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIPs: ips, Ports: ports},
	}
}

func sport(name string, proto corev1.Protocol, port int32, target intstr.IntOrString) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Protocol: proto, Port: port, TargetPort: target}
}

type ep struct {
	addr  string
	ready *bool
}

func slice(svcName, name string, ports []discoveryv1.EndpointPort, eps ...ep) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name,
			Labels: map[string]string{discoveryv1.LabelServiceName: svcName}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       ports,
	}
	for _, e := range eps {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{e.addr},
			Conditions: discoveryv1.EndpointConditions{Ready: e.ready}})
	}
	return s
}

func eport(name string, proto corev1.Protocol, port int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: ptr.To(name), Protocol: ptr.To(proto), Port: ptr.To(port)}
}

func fe(addr string, port uint16, p Protocol) Frontend {
	return Frontend{Addr: netip.MustParseAddr(addr), Port: port, Proto: p}
}

func be(addr string, port uint16) Backend {
	return Backend{Addr: netip.MustParseAddr(addr), Port: port}
}

func TestTranslate(t *testing.T) {
	cases := []struct {
		name    string
		svc     *corev1.Service
		slices  []*discoveryv1.EndpointSlice
		want    State
		wantErr bool
	}{
		{
			name: "endpoint addresses no pod can have are left out and reported",
			svc:  svc("odd", []string{"10.96.0.11"}, sport("http", corev1.ProtocolTCP, 80, intstr.FromInt32(8080))),
			slices: []*discoveryv1.EndpointSlice{
				slice("odd", "a", []discoveryv1.EndpointPort{eport("http", corev1.ProtocolTCP, 8080)},
					ep{"255.255.255.255", nil}, ep{"239.1.2.3", nil}, ep{"224.0.0.1", nil}, ep{"240.0.0.1", nil},
					ep{"0.0.0.0", nil}, ep{"127.0.0.1", nil}, ep{"10.0.0.5", nil}),
			},
			want:    State{fe("10.96.0.11", 80, TCP): {be("10.0.0.5", 8080)}},
			wantErr: true,
		},
		{
			name: "ports by name, protocols kept apart, only ready endpoints",
			svc: svc("web", []string{"10.96.0.10"},
				sport("http", corev1.ProtocolTCP, 80, intstr.FromString("web")),
				sport("dns", corev1.ProtocolUDP, 53, intstr.FromInt32(5353)),
				sport("dns-tcp", corev1.ProtocolTCP, 53, intstr.FromInt32(5353))),
			slices: []*discoveryv1.EndpointSlice{
				slice("web", "a", []discoveryv1.EndpointPort{eport("http", corev1.ProtocolTCP, 8080), eport("dns", corev1.ProtocolUDP, 5353)},
					ep{"10.0.0.1", nil}, ep{"10.0.0.2", ptr.To(true)}, ep{"10.0.0.3", ptr.To(false)}),
				// Named target port resolving to another number on other pods.
				slice("web", "b", []discoveryv1.EndpointPort{eport("http", corev1.ProtocolTCP, 9090)}, ep{"10.0.0.4", nil}),
			},
			want: State{
				fe("10.96.0.10", 80, TCP): {be("10.0.0.1", 8080), be("10.0.0.2", 8080), be("10.0.0.4", 9090)},
				fe("10.96.0.10", 53, UDP): {be("10.0.0.1", 5353), be("10.0.0.2", 5353)},
				fe("10.96.0.10", 53, TCP): {},
			},
		},
		{
			name: "serving-but-terminating endpoints only when no endpoint is ready",
			svc: svc("roll", []string{"10.96.0.13"},
				sport("a", corev1.ProtocolTCP, 80, intstr.FromInt32(80)),
				sport("b", corev1.ProtocolTCP, 81, intstr.FromInt32(81))),
			slices: []*discoveryv1.EndpointSlice{
				termSlice("roll", "a", eport("a", corev1.ProtocolTCP, 80), []string{"10.0.0.5"}, []string{"10.0.0.6"}),
				termSlice("roll", "b", eport("b", corev1.ProtocolTCP, 81), nil, []string{"10.0.0.7"}),
			},
			want: State{
				fe("10.96.0.13", 80, TCP): {be("10.0.0.5", 80)},
				fe("10.96.0.13", 81, TCP): {be("10.0.0.7", 81)},
			},
		},
		{
			name: "headless has no frontends",
			svc:  svc("h", []string{"None"}, sport("", corev1.ProtocolTCP, 80, intstr.FromInt32(80))),
			want: State{},
		},
		{
			name: "dual stack keeps the IPv4 cluster IP, IPv6 endpoints ignored",
			svc:  svc("d", []string{"fd00::10", "10.96.0.11"}, sport("", corev1.ProtocolSCTP, 9, intstr.FromInt32(9))),
			slices: []*discoveryv1.EndpointSlice{
				slice("d", "v4", []discoveryv1.EndpointPort{eport("", corev1.ProtocolSCTP, 9)}, ep{"10.0.0.9", nil}),
			},
			want: State{fe("10.96.0.11", 9, SCTP): {be("10.0.0.9", 9)}},
		},
		{
			name: "a bad cluster IP is reported, good ports still served",
			svc: svc("bad", []string{"10.96.0.300", "10.96.0.12"},
				sport("a", corev1.ProtocolTCP, 80, intstr.FromInt32(80)),
				sport("b", "ICMP", 81, intstr.FromInt32(81))),
			want:    State{fe("10.96.0.12", 80, TCP): {}},
			wantErr: true,
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := Translate(c.svc, c.slices)
			if (err != nil) != c.wantErr {
				t.Fatalf("err = %v, want error %v", err, c.wantErr)
			}
			if !reflect.DeepEqual(got, c.want) {
				t.Fatalf("got  %v\nwant %v", got, c.want)
			}
		})
	}
}

func TestBuilderReportsOnlyChangedFrontends(t *testing.T) {
	b := NewBuilder()
	a := svc("a", []string{"10.96.0.1"}, sport("", corev1.ProtocolTCP, 80, intstr.FromInt32(80)))
	c := svc("c", []string{"10.96.0.2"}, sport("", corev1.ProtocolTCP, 80, intstr.FromInt32(80)))
	if d, _ := b.UpsertService(a); len(d) != 1 {
		t.Fatalf("new service: dirty %v", d)
	}
	b.UpsertService(c)
	d, _ := b.UpsertSlice(slice("a", "s1", []discoveryv1.EndpointPort{eport("", corev1.ProtocolTCP, 80)}, ep{"10.0.0.1", nil}))
	if len(d) != 1 || d[0] != fe("10.96.0.1", 80, TCP) {
		t.Fatalf("slice of a: dirty %v, want only a's frontend", d)
	}
	if d, _ := b.UpsertService(a); len(d) != 0 {
		t.Fatalf("unchanged service: dirty %v", d)
	}
	if bs, ok := b.Desired(fe("10.96.0.1", 80, TCP)); !ok || len(bs) != 1 {
		t.Fatalf("desired a: %v %v", bs, ok)
	}
	d = b.DeleteService(typesNN("ns", "a"))
	if len(d) != 1 {
		t.Fatalf("delete: dirty %v", d)
	}
	if _, ok := b.Desired(fe("10.96.0.1", 80, TCP)); ok {
		t.Fatal("deleted service still desired")
	}
	if len(b.State()) != 1 {
		t.Fatalf("state %v, want only c", b.State())
	}
}

// termSlice has ready endpoints and serving-but-terminating ones, plus one that is neither.
func termSlice(svcName, name string, port discoveryv1.EndpointPort, ready, terminating []string) *discoveryv1.EndpointSlice {
	s := slice(svcName, name, []discoveryv1.EndpointPort{port})
	for _, a := range ready {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{a},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)}})
	}
	for _, a := range terminating {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{a},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(false), Serving: ptr.To(true), Terminating: ptr.To(true)}})
	}
	s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{"10.0.0.99"},
		Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(false), Serving: ptr.To(false), Terminating: ptr.To(true)}})
	return s
}
