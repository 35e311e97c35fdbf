//go:build linux

package lab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/test/k8s/nsbridge"
)

// APIServerAddr is where the apiserver answers inside the VPC, as the internal load balancer
// in front of a managed control plane does on Alibaba Cloud: an address of the VPC router's
// namespace (outside every vSwitch, inside the VPC CIDR, so no masquerade applies), bridged
// to the apiserver on the root namespace's loopback. It is the endpoint of the `kubernetes`
// Service, so pods and host-network processes reach the apiserver through its ClusterIP.
const APIServerAddr = "192.168.255.10"

// apiServerSliceManager marks the `kubernetes` EndpointSlice as the lab's: the apiserver's
// own endpoint reconciler is off (it refuses 127.0.0.1 as an advertise address) and no
// controller owns a selectorless Service's slices.
const apiServerSliceManager = "lab.tern.invalid"

// APIServerEndpoint is APIServerAddr with the apiserver's port; empty unless Kubernetes.
func (l *Lab) APIServerEndpoint() string {
	if l.kube == nil || l.kube.vpcBridge == nil {
		return ""
	}
	return l.kube.vpcBridge.Addr().String()
}

// serveAPIServerInVPC puts APIServerAddr on the VPC router's loopback, bridges it to the
// apiserver (same port) and writes the `kubernetes` Service's EndpointSlice for it.
func (l *Lab) serveAPIServerInVPC(ctx context.Context) error {
	target := strings.TrimPrefix(l.kube.cp.APIServerURL(), "https://")
	_, portStr, err := net.SplitHostPort(target)
	if err != nil {
		return fmt.Errorf("lab: apiserver URL %s: %w", l.kube.cp.APIServerURL(), err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return fmt.Errorf("lab: apiserver port %q: %w", portStr, err)
	}
	addr := netip.MustParseAddr(APIServerAddr)
	if err := nsutil.Do(l.vpc, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return err
		}
		return netlink.AddrReplace(lo, &netlink.Addr{IPNet: netipNet(netip.PrefixFrom(addr, 32))})
	}); err != nil {
		return fmt.Errorf("lab: put %s on the VPC router's loopback: %w", APIServerAddr, err)
	}
	b, err := nsbridge.Start(nsbridge.Config{NS: l.vpc, Target: target, Listen: net.JoinHostPort(APIServerAddr, portStr),
		Logger: l.log.Named("nsbridge")})
	if err != nil {
		return fmt.Errorf("lab: bridge the apiserver into the VPC at %s: %w", APIServerAddr, err)
	}
	l.kube.vpcBridge = b
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: "kubernetes", Namespace: metav1.NamespaceDefault, Labels: map[string]string{
			discoveryv1.LabelServiceName: "kubernetes", discoveryv1.LabelManagedBy: apiServerSliceManager}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{APIServerAddr},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)}}},
		Ports: []discoveryv1.EndpointPort{{Name: ptr.To("https"), Port: ptr.To(int32(port)), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	_, err = l.kube.client.DiscoveryV1().EndpointSlices(metav1.NamespaceDefault).Create(ctx, slice, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		_, err = l.kube.client.DiscoveryV1().EndpointSlices(metav1.NamespaceDefault).Update(ctx, slice, metav1.UpdateOptions{})
	}
	if err != nil {
		return fmt.Errorf("lab: write the EndpointSlice of the kubernetes Service (%s:%d): %w", APIServerAddr, port, err)
	}
	return nil
}

func netipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
