package kube

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/ptr"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/service"
)

// TestExclusiveEndpointsLeftOutOfLocal: the health check of an externalTrafficPolicy Local
// Service does not count this node's exclusive-ENI pods; each Service that starts leaving
// endpoints out is counted in the gauge and gets one Warning Event, and the gauge falls back
// when they are gone. A Cluster Service counts nothing.
func TestExclusiveEndpointsLeftOutOfLocal(t *testing.T) {
	reg := prometheus.NewRegistry()
	x, err := newExclusiveLocal(reg)
	if err != nil {
		t.Fatal(err)
	}
	rec := record.NewFakeRecorder(10)
	s := &serviceLB{deps: agent.Deps{Config: agent.Config{NodeName: "me"}}, recorder: rec, log: zap.NewNop(), exclusive: x}
	s.node.Exclusive = []netip.Addr{netip.MustParseAddr("10.0.1.2")}

	mk := func(name string, etp corev1.ServiceExternalTrafficPolicy) *service.Service {
		return (*service.Compactor)(nil).Service(&corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name},
			Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, ExternalTrafficPolicy: etp, HealthCheckNodePort: 32000,
				Ports: []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}}},
		})
	}
	ep := func(addr string) discoveryv1.Endpoint {
		return discoveryv1.Endpoint{Addresses: []string{addr}, NodeName: ptr.To("me"),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}}
	}
	both := service.CompactSlices([]*discoveryv1.EndpointSlice{{AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{ep("10.0.1.1"), ep("10.0.1.2")}}})
	plainOnly := service.CompactSlices([]*discoveryv1.EndpointSlice{{AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{ep("10.0.1.1")}}})
	local, cluster := mk("local", corev1.ServiceExternalTrafficPolicyLocal), mk("cluster", corev1.ServiceExternalTrafficPolicyCluster)
	nnL, nnC := types.NamespacedName{Namespace: "ns", Name: "local"}, types.NamespacedName{Namespace: "ns", Name: "cluster"}

	check := func(what string, got, want int, gauge float64, events int) {
		t.Helper()
		if got != want {
			t.Fatalf("%s: %d local endpoints, want %d", what, got, want)
		}
		if g := testutil.ToFloat64(x.gauge); g != gauge {
			t.Fatalf("%s: gauge %v, want %v", what, g, gauge)
		}
		if len(rec.Events) != events {
			t.Fatalf("%s: %d events waiting, want %d", what, len(rec.Events), events)
		}
	}
	check("Local with an exclusive endpoint", s.localReady(nnL, local, both), 1, 1, 1)
	if ev := <-rec.Events; !strings.Contains(ev, "Warning ExclusiveENIEndpointNotLocal") {
		t.Fatalf("event %q", ev)
	}
	check("the same again: no second Event", s.localReady(nnL, local, both), 1, 1, 0)
	check("Cluster counts every endpoint", s.localReady(nnC, cluster, both), 2, 1, 0)
	check("the exclusive endpoint gone", s.localReady(nnL, local, plainOnly), 1, 0, 0)
	check("back", s.localReady(nnL, local, both), 1, 1, 1)
	check("the Service deleted", s.localReady(nnL, nil, nil), 0, 0, 1)
}
