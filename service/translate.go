package service

import (
	"errors"
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// Translate computes the frontends of one Service from the EndpointSlices that belong to
// it. It keeps what it can: a bad port or address is reported in the returned error (for a
// log line and an Event) while every valid frontend is still returned.
//
// Rules, matching kube-proxy: ExternalName and headless Services have no frontends; every
// IPv4 cluster IP gets one frontend per Service port; a Service port's backends are the
// endpoints of slice ports with the same name and protocol (the EndpointSlice controller has
// already resolved named target ports per pod, so one Service port can map to different
// numbers on different pods); ready endpoints count (a missing ready condition means ready,
// as the API defines), and serving-but-terminating ones only when none is ready.
func Translate(svc *corev1.Service, eps []*discoveryv1.EndpointSlice) (State, error) {
	out := State{}
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return out, nil
	}
	var errs []error
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 && svc.Spec.ClusterIP != "" {
		ips = []string{svc.Spec.ClusterIP}
	}
	var vips []netip.Addr
	for _, s := range ips {
		if s == corev1.ClusterIPNone {
			return out, nil
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("cluster IP %q: %w", s, err))
			continue
		}
		if a.Is4() {
			vips = append(vips, a)
		}
	}

	for _, sp := range svc.Spec.Ports {
		proto, err := protocolOf(sp.Protocol)
		if err != nil {
			errs = append(errs, fmt.Errorf("port %q: %w", sp.Name, err))
			continue
		}
		if sp.Port <= 0 || sp.Port > 65535 {
			errs = append(errs, fmt.Errorf("port %q: number %d out of range 1-65535", sp.Name, sp.Port))
			continue
		}
		backends, bad := readyBackends(sp.Name, sp.Protocol, eps)
		for _, a := range bad {
			errs = append(errs, fmt.Errorf("port %q: endpoint address %q is not a unicast IPv4 address a pod can have; it is left out", sp.Name, a))
		}
		for _, vip := range vips {
			out[Frontend{Addr: vip, Port: uint16(sp.Port), Proto: proto}] = backends
		}
	}
	if len(errs) > 0 {
		return out, fmt.Errorf("service %s/%s: %w", svc.Namespace, svc.Name, errors.Join(errs...))
	}
	return out, nil
}

func protocolOf(p corev1.Protocol) (Protocol, error) {
	switch p {
	case corev1.ProtocolTCP, "":
		return TCP, nil
	case corev1.ProtocolUDP:
		return UDP, nil
	case corev1.ProtocolSCTP:
		return SCTP, nil
	}
	return 0, fmt.Errorf("unsupported protocol %q (want TCP, UDP or SCTP)", p)
}

// readyBackends returns the backends of one Service port: its ready endpoints or, when none
// is ready, the ones that are still serving while terminating (kube-proxy does the same, so
// that a rolling update or a scale-down to zero does not cut traffic before pods stop).
// Addresses that no backend can have (unspecified, broadcast, multicast, class E, loopback)
// are left out and returned, so that the caller reports them.
func readyBackends(portName string, proto corev1.Protocol, eps []*discoveryv1.EndpointSlice) ([]Backend, []string) {
	var bad []string
	if proto == "" {
		proto = corev1.ProtocolTCP
	}
	var ready, terminating []Backend
	for _, s := range eps {
		if s.AddressType != discoveryv1.AddressTypeIPv4 {
			continue
		}
		for _, p := range s.Ports {
			name, pproto := "", corev1.ProtocolTCP
			if p.Name != nil {
				name = *p.Name
			}
			if p.Protocol != nil {
				pproto = *p.Protocol
			}
			if name != portName || pproto != proto || p.Port == nil || *p.Port <= 0 || *p.Port > 65535 {
				continue
			}
			for _, e := range s.Endpoints {
				c := e.Conditions
				isReady := c.Ready == nil || *c.Ready
				servingTerminating := c.Serving != nil && *c.Serving && c.Terminating != nil && *c.Terminating
				if !isReady && !servingTerminating {
					continue
				}
				for _, a := range e.Addresses {
					addr, err := netip.ParseAddr(a)
					if err != nil || !addr.Is4() || !isBackendAddr(addr) {
						bad = append(bad, a)
						continue
					}
					b := Backend{Addr: addr, Port: uint16(*p.Port)}
					if isReady {
						ready = append(ready, b)
					} else {
						terminating = append(terminating, b)
					}
				}
			}
		}
	}
	if len(ready) == 0 {
		ready = terminating
	}
	if ready == nil {
		ready = []Backend{}
	}
	return normalize(ready), bad
}

var classE = netip.MustParsePrefix("240.0.0.0/4")

// isBackendAddr tells whether a pod could have addr: a unicast address that is not the
// unspecified, loopback, multicast or class E (reserved, including limited broadcast) one.
func isBackendAddr(addr netip.Addr) bool {
	return !addr.IsUnspecified() && !addr.IsLoopback() && !addr.IsMulticast() && !classE.Contains(addr)
}
