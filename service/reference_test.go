package service

// The translation of main before Services and EndpointSlices were cached as compact
// structs (compact.go), kept verbatim as an oracle: TestCompactTranslatesAsAPI and
// FuzzTranslate check that translating the compact copies gives exactly what translating
// the API objects gave, errors included. Only the functions that read API types are here;
// endpoint selection (endpointsFor, topology) is shared. One rule was added to both since:
// a Service address (cluster IP, LoadBalancer ingress IP, externalIP) that is not unicast
// gets no frontend and an error (refUnicast).

import (
	"errors"
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

func (tr Translator) refTranslate(svc *corev1.Service, eps []*discoveryv1.EndpointSlice) (State, map[Frontend]Options, error) {
	out := State{}
	opts := map[Frontend]Options{}
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return out, opts, nil
	}
	var errs []error
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 && svc.Spec.ClusterIP != "" {
		ips = []string{svc.Spec.ClusterIP}
	}
	var vips []netip.Addr
	for _, s := range ips {
		if s == corev1.ClusterIPNone {
			return out, opts, nil
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("cluster IP %q: %w", s, err))
			continue
		}
		if a.Is4() {
			if err := refUnicast("cluster IP", a); err != nil {
				errs = append(errs, err)
				continue
			}
			vips = append(vips, a)
		}
	}
	base, err := tr.refServiceOptions(svc)
	if err != nil {
		errs = append(errs, err)
	}
	local := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	extLocal := svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal
	lbIPs, extIPs, ipErrs := refExternalAddrs(svc)
	errs = append(errs, ipErrs...)
	ranges, err := canonicalRanges(svc.Spec.LoadBalancerSourceRanges)
	if err != nil {
		errs = append(errs, err)
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
		all, bad := refEndpointsOf(sp.Name, sp.Protocol, eps, tr.Node.Name)
		for _, a := range bad {
			errs = append(errs, fmt.Errorf("port %q: endpoint address %q is not a unicast IPv4 address a pod can have; it is left out", sp.Name, a))
		}
		backends, dropEmpty := tr.endpointsFor(all, local)
		o := base
		o.DropWhenEmpty = dropEmpty
		if o.MaglevSize != 0 {
			o.MaglevSize = MaglevSize(len(backends), tr.MaglevTableSize)
		}
		for _, vip := range vips {
			f := Frontend{Addr: vip, Port: uint16(sp.Port), Proto: proto}
			out[f] = backends
			opts[f] = o
		}
		ext := refExternalFrontends(svc, sp, proto, tr.Node.Addrs, lbIPs, extIPs)
		if len(ext) == 0 {
			continue
		}
		// externalTrafficPolicy decides the external frontends' backends, as
		// internalTrafficPolicy decides the cluster IP's.
		extBackends, extDrop := tr.endpointsFor(all, extLocal)
		eo := base
		eo.DropWhenEmpty = extDrop
		if eo.MaglevSize != 0 {
			eo.MaglevSize = MaglevSize(len(extBackends), tr.MaglevTableSize)
		}
		// In-cluster clients of an eTP Local frontend get every endpoint (kube-proxy sends
		// them to the cluster-wide chain): an Internal twin with the cluster endpoints.
		var twinBackends []Backend
		if extLocal {
			twinBackends, _ = tr.endpointsFor(all, false)
		}
		for f, kind := range ext {
			o := eo
			o.Kind = kind
			if kind == KindLoadBalancer {
				o.SourceRanges = ranges
			}
			o.ExternalLocal = extLocal
			out[f] = extBackends
			opts[f] = o
			if extLocal {
				twin, to := f, o
				twin.Internal = true
				to.ExternalLocal, to.DropWhenEmpty = false, false
				if to.MaglevSize != 0 {
					to.MaglevSize = MaglevSize(len(twinBackends), tr.MaglevTableSize)
				}
				out[twin] = twinBackends
				opts[twin] = to
			}
		}
	}
	if len(errs) > 0 {
		return out, opts, fmt.Errorf("service %s/%s: %w", svc.Namespace, svc.Name, errors.Join(errs...))
	}
	return out, opts, nil
}

// refExternalAddrs reads a Service's LoadBalancer ingress IPs (type LoadBalancer only, and
// not those whose ipMode is Proxy: kube-proxy leaves those to the load balancer) and its
// externalIPs, IPv4 only.
func refExternalAddrs(svc *corev1.Service) (lb, ext []netip.Addr, errs []error) {
	if svc.Spec.Type == corev1.ServiceTypeLoadBalancer {
		for _, in := range svc.Status.LoadBalancer.Ingress {
			if in.IP == "" || (in.IPMode != nil && *in.IPMode == corev1.LoadBalancerIPModeProxy) {
				continue
			}
			a, err := netip.ParseAddr(in.IP)
			if err != nil {
				errs = append(errs, fmt.Errorf("load balancer ingress IP %q: %w", in.IP, err))
				continue
			}
			if a.Is4() {
				if err := refUnicast("load balancer ingress IP", a); err != nil {
					errs = append(errs, err)
					continue
				}
				lb = append(lb, a)
			}
		}
	}
	for _, s := range svc.Spec.ExternalIPs {
		a, err := netip.ParseAddr(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("external IP %q: %w", s, err))
			continue
		}
		if a.Is4() {
			if err := refUnicast("external IP", a); err != nil {
				errs = append(errs, err)
				continue
			}
			ext = append(ext, a)
		}
	}
	return lb, ext, errs
}

func refUnicast(what string, a netip.Addr) error {
	if a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() || netip.MustParsePrefix("240.0.0.0/4").Contains(a) {
		return fmt.Errorf("%s %s is not a unicast address (it is unspecified, loopback, multicast or reserved); it gets no frontend", what, a)
	}
	return nil
}

// refExternalFrontends are one Service port's frontends for clients outside the cluster IP:
// a NodePort on every node address (types NodePort and LoadBalancer), every LoadBalancer
// ingress IP and every externalIP, on the Service port.
func refExternalFrontends(svc *corev1.Service, sp corev1.ServicePort, proto Protocol, nodeAddrs, lbIPs, extIPs []netip.Addr) map[Frontend]Kind {
	out := map[Frontend]Kind{}
	if (svc.Spec.Type == corev1.ServiceTypeNodePort || svc.Spec.Type == corev1.ServiceTypeLoadBalancer) &&
		sp.NodePort > 0 && sp.NodePort <= 65535 {
		for _, a := range nodeAddrs {
			if a.Is4() {
				out[Frontend{Addr: a, Port: uint16(sp.NodePort), Proto: proto}] = KindNodePort
			}
		}
	}
	for _, a := range extIPs {
		out[Frontend{Addr: a, Port: uint16(sp.Port), Proto: proto}] = KindExternalIP
	}
	// A LoadBalancer IP that is also an externalIP keeps its source ranges.
	for _, a := range lbIPs {
		out[Frontend{Addr: a, Port: uint16(sp.Port), Proto: proto}] = KindLoadBalancer
	}
	return out
}

func refEndpointsOf(portName string, proto corev1.Protocol, eps []*discoveryv1.EndpointSlice, node string) ([]endpoint, []string) {
	var (
		bad []string
		out []endpoint
	)
	if proto == "" {
		proto = corev1.ProtocolTCP
	}
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
				base := endpoint{
					ready:       c.Ready == nil || *c.Ready,
					serving:     c.Serving == nil || *c.Serving,
					terminating: c.Terminating != nil && *c.Terminating,
					local:       node != "" && e.NodeName != nil && *e.NodeName == node,
				}
				if e.Hints != nil {
					for _, z := range e.Hints.ForZones {
						base.zoneHints = append(base.zoneHints, z.Name)
					}
					for _, n := range e.Hints.ForNodes {
						base.nodeHints = append(base.nodeHints, n.Name)
					}
				}
				for _, a := range e.Addresses {
					addr, err := netip.ParseAddr(a)
					if err != nil || !addr.Is4() || !isUnicastAddr(addr) {
						bad = append(bad, a)
						continue
					}
					ep := base
					ep.b = Backend{Addr: addr, Port: uint16(*p.Port)}
					out = append(out, ep)
				}
			}
		}
	}
	return out, bad
}

func (tr Translator) refServiceOptions(svc *corev1.Service) (Options, error) {
	var o Options
	var errs []error
	if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		o.AffinitySeconds = DefaultAffinitySeconds
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			// The apiserver validates 1..86400; anything else falls back to the default.
			if s := *c.ClientIP.TimeoutSeconds; s > 0 && s <= 86400 {
				o.AffinitySeconds = uint32(s)
			} else {
				errs = append(errs, fmt.Errorf("sessionAffinityConfig.clientIP.timeoutSeconds %d out of range 1-86400; using %d", s, DefaultAffinitySeconds))
			}
		}
	}
	algo := tr.DefaultAlgorithm
	for _, key := range []string{AnnotationLBAlgorithm, AnnotationCiliumLBAlgorithm} {
		v, ok := svc.Annotations[key]
		if !ok {
			continue
		}
		a, err := ParseAlgorithm(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("annotation %s: %w; using the node default", key, err))
			continue
		}
		algo = a
		break
	}
	if algo == AlgorithmMaglev {
		o.MaglevSize = 1 // sized per port once its backends are known (Translate)
	}
	return o, errors.Join(errs...)
}
