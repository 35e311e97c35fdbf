package main

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/tern-net/tern/test/bench/etcdput"
)

// With -fill etcd the filler Services and slices are written straight into the lab's etcd
// (test/bench/etcdput): 20,000 objects in seconds where the API took 15 min at this
// machine's load. Each filler's cluster IP also gets the IPAddress object the apiserver's
// allocator would have written, so the allocator never hands that address to a Service
// created through the API later (the sentinels). The objects are what the API would have
// stored for createFiller's: defaulted, without admission.
const (
	fillEtcd = "etcd"
	fillAPI  = "api"
)

// etcdFiller hands out the fillers' cluster IPs: from the service range's upper part
// (10.96.4.0 on; the allocator's static band is the first 256 addresses of a /16), skipping
// every address an IPAddress object already holds.
type etcdFiller struct {
	w      *etcdput.Writer
	taken  map[netip.Addr]bool
	nextIP netip.Addr
}

// newEtcdFiller lists the IPAddresses the apiserver holds; prev, when not nil, is the last
// fill's filler, whose writer and next address are kept.
func (b *bench) newEtcdFiller(ctx context.Context, prev *etcdFiller) (*etcdFiller, error) {
	ips, err := b.client.NetworkingV1().IPAddresses().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list IPAddresses (the cluster IPs the apiserver allocated): %w", err)
	}
	f := &etcdFiller{w: etcdput.New(b.l.ControlPlane().EtcdURL()), taken: map[netip.Addr]bool{},
		nextIP: netip.MustParseAddr("10.96.4.0")}
	if prev != nil {
		f.w, f.nextIP = prev.w, prev.nextIP
	}
	for _, ip := range ips.Items {
		if a, err := netip.ParseAddr(ip.Name); err == nil {
			f.taken[a] = true
		}
	}
	return f, nil
}

func (f *etcdFiller) clusterIP() (netip.Addr, error) {
	for f.taken[f.nextIP] {
		f.nextIP = f.nextIP.Next()
	}
	ip := f.nextIP
	if ip.As4()[1] != 96 || ip.As4()[3] == 255 && ip.As4()[2] == 255 {
		return netip.Addr{}, fmt.Errorf("-fill etcd: no cluster IP left in 10.96.0.0/16 at %s", ip)
	}
	f.taken[ip] = true
	f.nextIP = ip.Next()
	return ip, nil
}

// fillEtcd writes fillers [from, to): a Service, its IPAddress and one EndpointSlice each.
func (b *bench) fillEtcd(ctx context.Context, from, to int) error {
	// The addresses taken are read again before every fill: the sentinels created through
	// the API since the last one hold addresses of their own.
	f, err := b.newEtcdFiller(ctx, b.etcd)
	if err != nil {
		return err
	}
	b.etcd = f
	now := metav1.NewTime(time.Now().Truncate(time.Second))
	// Each filler's IPAddress goes first, in the same transaction as its Service: the
	// apiserver's repair loop checks a new Service against its IPAddress cache, and one it
	// sees first is "not allocated" to it (an Event and a failed IPAddress create, retried).
	// Waiting for every IPAddress to be listed before writing the Services does not work at
	// this scale: the loop deletes an IPAddress whose Service is still missing after 60 s.
	for i := from; i < to; i++ {
		ip, err := b.etcd.clusterIP()
		if err != nil {
			return err
		}
		svc, slice, addr := fillerObjects(i, ip, now)
		if err := b.etcd.w.Put(ctx, "/registry/ipaddresses/"+addr.Name, addr); err != nil {
			return err
		}
		if err := b.etcd.w.Put(ctx, "/registry/services/specs/"+fillNS+"/"+svc.Name, svc); err != nil {
			return err
		}
		if err := b.etcd.w.Put(ctx, "/registry/endpointslices/"+fillNS+"/"+slice.Name, slice); err != nil {
			return err
		}
	}
	return b.etcd.w.Flush(ctx)
}

// fillerObjects are filler i's Service (cluster IP ip), EndpointSlice and IPAddress as the
// apiserver would store createFiller's.
func fillerObjects(i int, ip netip.Addr, now metav1.Time) (*corev1.Service, *discoveryv1.EndpointSlice, *networkingv1.IPAddress) {
	name := fmt.Sprintf("fill-%05d", i)
	uid := func(kind byte) types.UID {
		return types.UID(fmt.Sprintf("%08x-0000-4000-8000-0000000000%02x", i, kind))
	}
	svc := &corev1.Service{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Service"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: fillNS, UID: uid('s'), CreationTimestamp: now},
		Spec: corev1.ServiceSpec{
			Ports: []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: svcEcho,
				TargetPort: intstr.FromInt32(echoPort)}},
			ClusterIP: ip.String(), ClusterIPs: []string{ip.String()},
			Type: corev1.ServiceTypeClusterIP, SessionAffinity: corev1.ServiceAffinityNone,
			IPFamilies:            []corev1.IPFamily{corev1.IPv4Protocol},
			IPFamilyPolicy:        ptr.To(corev1.IPFamilyPolicySingleStack),
			InternalTrafficPolicy: ptr.To(corev1.ServiceInternalTrafficPolicyCluster),
		},
	}
	eps := make([]discoveryv1.Endpoint, backends)
	for j := range eps {
		eps[j] = discoveryv1.Endpoint{Addresses: []string{fillerEndpoint(i, j)},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)}}
	}
	slice := &discoveryv1.EndpointSlice{
		TypeMeta: metav1.TypeMeta{APIVersion: "discovery.k8s.io/v1", Kind: "EndpointSlice"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: fillNS, UID: uid('e'), CreationTimestamp: now,
			Labels: map[string]string{discoveryv1.LabelServiceName: name, discoveryv1.LabelManagedBy: fillManagedBy}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   eps,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](echoPort), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	addr := &networkingv1.IPAddress{
		TypeMeta: metav1.TypeMeta{APIVersion: "networking.k8s.io/v1", Kind: "IPAddress"},
		ObjectMeta: metav1.ObjectMeta{Name: ip.String(), UID: uid('i'), CreationTimestamp: now,
			Labels: map[string]string{networkingv1.LabelIPAddressFamily: string(corev1.IPv4Protocol),
				networkingv1.LabelManagedBy: "ipallocator.k8s.io"}},
		Spec: networkingv1.IPAddressSpec{ParentRef: &networkingv1.ParentReference{Group: "", Resource: "services",
			Namespace: fillNS, Name: name}},
	}
	return svc, slice, addr
}
