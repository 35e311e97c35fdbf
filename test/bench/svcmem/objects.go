package main

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/tern-net/tern/test/bench/etcdput"
)

const (
	benchNamespace = "svcmem"
)

// shape is how much an object carries besides what tern reads.
type shape string

const (
	// shapeRealistic: what `kubectl expose` and the EndpointSlice controller write (labels,
	// selector, owner reference, the trigger-time annotation, a managedFields entry; each
	// endpoint with its pod reference, node and zone).
	shapeRealistic shape = "realistic"
	// shapeMinimal: what test/bench/kubeproxy and convergence write (no selector, no
	// targetRef, node or zone), to compare with their figures.
	shapeMinimal shape = "minimal"
)

func serviceName(i int) string { return fmt.Sprintf("svc-%05d", i) }

// clusterIP i is in 10.96.0.0/16 (the control plane's default range), skipping .0.0 and
// the kubernetes Service's 10.96.0.1.
func clusterIP(i int) string {
	n := i + 16
	return netip.AddrFrom4([4]byte{10, 96, byte(n >> 8), byte(n)}).String()
}

func endpointIP(i, j, each int) string {
	n := uint32(i*each + j + 1)
	return netip.AddrFrom4([4]byte{172, byte(16 + n>>16), byte(n >> 8), byte(n)}).String()
}

func uid(kind string, i int) types.UID {
	return types.UID(fmt.Sprintf("%08x-0000-4000-8000-%012x", i, len(kind)))
}

func managedFields(manager string, now metav1.Time) []metav1.ManagedFieldsEntry {
	return []metav1.ManagedFieldsEntry{{
		Manager: manager, Operation: metav1.ManagedFieldsOperationUpdate, APIVersion: "v1", Time: &now,
		FieldsType: "FieldsV1",
		FieldsV1: &metav1.FieldsV1{Raw: []byte(`{"f:metadata":{"f:labels":{".":{},"f:app":{}}},` +
			`"f:spec":{"f:internalTrafficPolicy":{},"f:ports":{".":{},"k:{\"port\":80,\"protocol\":\"TCP\"}":{".":{},"f:name":{},"f:port":{},"f:protocol":{},"f:targetPort":{}}},` +
			`"f:selector":{},"f:sessionAffinity":{},"f:type":{}}}`)},
	}}
}

func makeService(i int, sh shape, now metav1.Time) *corev1.Service {
	name := serviceName(i)
	svc := &corev1.Service{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Service"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: benchNamespace, UID: uid("Service", i),
			CreationTimestamp: now},
		Spec: corev1.ServiceSpec{
			Ports: []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80,
				TargetPort: intstr.FromInt32(8080)}},
			ClusterIP: clusterIP(i), ClusterIPs: []string{clusterIP(i)},
			Type: corev1.ServiceTypeClusterIP, SessionAffinity: corev1.ServiceAffinityNone,
			IPFamilies:            []corev1.IPFamily{corev1.IPv4Protocol},
			IPFamilyPolicy:        ptr.To(corev1.IPFamilyPolicySingleStack),
			InternalTrafficPolicy: ptr.To(corev1.ServiceInternalTrafficPolicyCluster),
		},
	}
	if sh == shapeRealistic {
		svc.Labels = map[string]string{"app": name}
		svc.Spec.Selector = map[string]string{"app": name}
		svc.ManagedFields = managedFields("kubectl-expose", now)
	}
	return svc
}

func makeSlice(i, each int, sh shape, now metav1.Time) *discoveryv1.EndpointSlice {
	name := serviceName(i)
	s := &discoveryv1.EndpointSlice{
		TypeMeta: metav1.TypeMeta{APIVersion: "discovery.k8s.io/v1", Kind: "EndpointSlice"},
		ObjectMeta: metav1.ObjectMeta{Name: name + "-x7k2q", Namespace: benchNamespace, UID: uid("EndpointSlice", i),
			CreationTimestamp: now,
			Labels: map[string]string{discoveryv1.LabelServiceName: name,
				discoveryv1.LabelManagedBy: "svcmem-bench.tern.invalid"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Protocol: ptr.To(corev1.ProtocolTCP), Port: ptr.To[int32](8080)}},
	}
	for j := range each {
		ep := discoveryv1.Endpoint{Addresses: []string{endpointIP(i, j, each)},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)}}
		if sh == shapeRealistic {
			pod := fmt.Sprintf("%s-7d9f8c6b5-%05d", name, j)
			ep.TargetRef = &corev1.ObjectReference{Kind: "Pod", Namespace: benchNamespace, Name: pod,
				UID: types.UID(fmt.Sprintf("%08x-%04x-4000-8000-00000000p0d", i, j))}
			ep.NodeName = ptr.To(fmt.Sprintf("node-%03d", (i+j)%100))
			ep.Zone = ptr.To(fmt.Sprintf("cn-hangzhou-%c", 'h'+(i+j)%3))
		}
		s.Endpoints = append(s.Endpoints, ep)
	}
	if sh == shapeRealistic {
		s.GenerateName = name + "-"
		s.Labels["app"] = name
		s.Labels[discoveryv1.LabelManagedBy] = "endpointslice-controller.k8s.io"
		s.Annotations = map[string]string{corev1.EndpointsLastChangeTriggerTime: now.UTC().Format(time.RFC3339)}
		s.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Service", Name: name,
			UID: uid("Service", i), Controller: ptr.To(true), BlockOwnerDeletion: ptr.To(true)}}
		s.ManagedFields = managedFields("kube-controller-manager", now)
	}
	return s
}

// etcdLoader writes the benchmark's objects straight into the apiserver's etcd
// (test/bench/etcdput).
type etcdLoader struct{ w *etcdput.Writer }

func newEtcdLoader(url string) *etcdLoader { return &etcdLoader{w: etcdput.New(url)} }

// load writes n Services with one EndpointSlice of each endpoints each.
func (l *etcdLoader) load(ctx context.Context, n, each int, sh shape) error {
	now := metav1.NewTime(time.Now().Truncate(time.Second))
	for i := range n {
		name := serviceName(i)
		if err := l.w.Put(ctx, "/registry/services/specs/"+benchNamespace+"/"+name, makeService(i, sh, now)); err != nil {
			return err
		}
		s := makeSlice(i, each, sh, now)
		if err := l.w.Put(ctx, "/registry/endpointslices/"+benchNamespace+"/"+s.Name, s); err != nil {
			return err
		}
	}
	return l.w.Flush(ctx)
}
