package service

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// Translate computes the frontends of one Service from the EndpointSlices that belong to
// it, for a node that knows nothing of itself (no endpoint is local, no zone): the
// Translator's rules with a zero Translator, without the options.
func Translate(svc *corev1.Service, eps []*discoveryv1.EndpointSlice) (State, error) {
	st, _, err := Translator{}.Translate(svc, eps)
	return st, err
}

// Translate is TranslateCompact of the API objects' compact copies.
func (tr Translator) Translate(svc *corev1.Service, eps []*discoveryv1.EndpointSlice) (State, map[Frontend]Options, error) {
	return tr.TranslateCompact((*Compactor)(nil).Service(svc), CompactSlices(eps))
}

// TranslateCompact computes the frontends of one Service from the EndpointSlices that
// belong to it, with each frontend's options. It keeps what it can: a bad port or address
// is reported in the returned error (for a log line and an Event) while every valid
// frontend is still returned.
//
// Rules, matching kube-proxy: ExternalName and headless Services have no frontends; every
// IPv4 cluster IP gets one frontend per Service port, and so do (externalFrontends) every
// node address for a NodePort, every LoadBalancer ingress IP and every externalIP, whose
// backends follow externalTrafficPolicy; a Service port's backends are the
// endpoints of slice ports with the same name and protocol (the EndpointSlice controller has
// already resolved named target ports per pod, so one Service port can map to different
// numbers on different pods); which endpoints serve is endpointsFor's business.
func (tr Translator) TranslateCompact(svc *Service, eps []*Slice) (State, map[Frontend]Options, error) {
	out := State{}
	opts := map[Frontend]Options{}
	if svc.flags&(svcExternalName|svcHeadless) != 0 {
		return out, opts, nil
	}
	errs := slices.Clone(svc.m().errs)
	base := tr.serviceOptions(svc)
	local := svc.flags&svcInternalLocal != 0
	extLocal := svc.flags&svcExternalLocal != 0

	for _, sp := range svc.Ports {
		if err := svc.portErr(&sp); err != nil {
			errs = append(errs, err)
			continue
		}
		all, bad := endpointsOf(sp.Name, sp.Proto, eps, tr.Node.Name)
		for _, a := range bad {
			errs = append(errs, fmt.Errorf("port %q: endpoint address %q is not a unicast IPv4 address a pod can have; it is left out", sp.Name, a))
		}
		backends, dropEmpty := tr.endpointsFor(all, local)
		o := base
		o.DropWhenEmpty = dropEmpty
		if o.MaglevSize != 0 {
			o.MaglevSize = MaglevSize(len(backends), tr.MaglevTableSize)
		}
		for _, vip := range svc.ClusterIPs {
			f := Frontend{Addr: vip, Port: sp.Port, Proto: sp.Proto}
			out[f] = backends
			opts[f] = o
		}
		ext := externalFrontends(svc, sp, tr.Node.Addrs)
		if len(ext) == 0 {
			continue
		}
		// externalTrafficPolicy decides the external frontends' backends, as
		// internalTrafficPolicy decides the cluster IP's.
		extAll := all
		if extLocal {
			extAll = notLocal(all, tr.Node.Exclusive)
		}
		extBackends, extDrop := tr.endpointsFor(extAll, extLocal)
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
				o.SourceRanges = svc.SourceRanges()
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

// externalFrontends are one Service port's frontends for clients outside the cluster IP:
// a NodePort on every node address (types NodePort and LoadBalancer), every LoadBalancer
// ingress IP and every externalIP, on the Service port.
func externalFrontends(svc *Service, sp Port, nodeAddrs []netip.Addr) map[Frontend]Kind {
	out := map[Frontend]Kind{}
	if svc.flags&svcNodePorts != 0 && sp.NodePort != 0 {
		for _, a := range nodeAddrs {
			if a.Is4() {
				out[Frontend{Addr: a, Port: sp.NodePort, Proto: sp.Proto}] = KindNodePort
			}
		}
	}
	for _, a := range svc.ExternalIPs() {
		out[Frontend{Addr: a, Port: sp.Port, Proto: sp.Proto}] = KindExternalIP
	}
	// A LoadBalancer IP that is also an externalIP keeps its source ranges.
	for _, a := range svc.LoadBalancerIPs() {
		out[Frontend{Addr: a, Port: sp.Port, Proto: sp.Proto}] = KindLoadBalancer
	}
	return out
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

// endpoint is one endpoint address of a Service port, with what kube-proxy looks at.
type endpoint struct {
	b                           Backend
	ready, serving, terminating bool
	local                       bool
	zoneHints, nodeHints        []string
}

// endpointsOf collects the endpoints of one Service port. Addresses that no backend can have
// (unspecified, broadcast, multicast, class E, loopback) were set aside by the Compactor and
// are returned, so that the caller reports them. Conditions were read as the API defines
// them (and kube-proxy reads them): a missing ready or serving means true, a missing
// terminating false.
func endpointsOf(portName string, proto Protocol, eps []*Slice, node string) ([]endpoint, []string) {
	var (
		bad []string
		out []endpoint
	)
	for _, s := range eps {
		if !s.IPv4 {
			continue
		}
		for _, p := range s.Ports {
			if p.Name != portName || p.Proto != proto {
				continue
			}
			for i := range s.Endpoints {
				e := &s.Endpoints[i]
				base := endpoint{
					ready:       e.Ready(),
					serving:     e.Serving(),
					terminating: e.Terminating(),
					local:       node != "" && e.Node == node,
				}
				if e.more != nil {
					base.zoneHints, base.nodeHints = e.more.zoneHints, e.more.nodeHints
					bad = append(bad, e.more.bad...)
				}
				for _, a := range e.Addrs() {
					ep := base
					ep.b = Backend{Addr: a, Port: p.Port}
					out = append(out, ep)
				}
			}
		}
	}
	return out, bad
}

// notLocal is all with the endpoints at the addresses in addrs taken for endpoints of
// another node (all itself when none is).
func notLocal(all []endpoint, addrs []netip.Addr) []endpoint {
	out, cloned := all, false
	for i, e := range all {
		if !e.local || !slices.Contains(addrs, e.b.Addr) {
			continue
		}
		if !cloned {
			out, cloned = slices.Clone(all), true
		}
		out[i].local = false
	}
	return out
}

// endpointsFor chooses the backends of a ClusterIP frontend from its endpoints as
// kube-proxy's CategorizeEndpoints does (pkg/proxy/topology.go, v1.37):
//
//   - internalTrafficPolicy Cluster: the ready endpoints, narrowed by topology hints when
//     they apply (topologyMode); when none is left, the serving-but-terminating ones (hints
//     ignored), so a rolling update or a scale-down to zero does not cut traffic early.
//   - internalTrafficPolicy Local: the ready endpoints on this node or, when there is none,
//     its serving-but-terminating ones. When none is local but the Service has usable
//     endpoints elsewhere, dropEmpty is true: kube-proxy drops (its "has no local
//     endpoints" rule) where a Service with no endpoints at all is rejected.
func (tr Translator) endpointsFor(all []endpoint, local bool) (backends []Backend, dropEmpty bool) {
	pick := func(keep func(endpoint) bool) []Backend {
		// Sized exactly: the Builder keeps every frontend's list, and append's doubling
		// would leave a third of them unused (5 backends in room for 8).
		n := 0
		for _, e := range all {
			if keep(e) {
				n++
			}
		}
		out := make([]Backend, 0, n)
		for _, e := range all {
			if keep(e) {
				out = append(out, e.b)
			}
		}
		return normalize(out)
	}
	servingTerminating := func(e endpoint) bool { return e.serving && e.terminating }
	if !local {
		mode := tr.topologyMode(all)
		bs := pick(func(e endpoint) bool { return e.ready && availableForTopology(e, mode, tr.Node) })
		if len(bs) == 0 {
			bs = pick(servingTerminating)
		}
		return bs, false
	}
	var anyUsable, localReady, localTerminating bool
	for _, e := range all {
		switch {
		case e.ready:
			anyUsable = true
			localReady = localReady || e.local
		case servingTerminating(e):
			anyUsable = true
			localTerminating = localTerminating || e.local
		}
	}
	switch {
	case localReady:
		return pick(func(e endpoint) bool { return e.local && e.ready }), false
	case localTerminating:
		return pick(func(e endpoint) bool { return e.local && servingTerminating(e) }), false
	}
	return []Backend{}, anyUsable
}

// Topology modes, named after the traffic distributions whose hints they follow.
const (
	topologyNone     = ""
	topologySameNode = "PreferSameNode"
	topologySameZone = "PreferSameZone"
)

// topologyMode is kube-proxy's topologyModeFromHints: hints are used only when every ready
// endpoint has them and at least one is for this node (node hints, checked first) or its
// zone (zone hints). Otherwise every ready endpoint serves, as if there were no hints.
func (tr Translator) topologyMode(all []endpoint) string {
	var anyReady, forNode, forZone bool
	allNode, allZone := true, true
	for _, e := range all {
		if !e.ready {
			continue
		}
		anyReady = true
		if len(e.nodeHints) == 0 {
			allNode = false
		} else if tr.Node.Name != "" && slices.Contains(e.nodeHints, tr.Node.Name) {
			forNode = true
		}
		if len(e.zoneHints) == 0 {
			allZone = false
		} else if tr.Node.Zone != "" && slices.Contains(e.zoneHints, tr.Node.Zone) {
			forZone = true
		}
	}
	switch {
	case !anyReady:
		return topologyNone
	case allNode && forNode:
		return topologySameNode
	case allZone && forZone:
		return topologySameZone
	}
	return topologyNone
}

func availableForTopology(e endpoint, mode string, n Node) bool {
	switch mode {
	case topologySameNode:
		return slices.Contains(e.nodeHints, n.Name)
	case topologySameZone:
		return slices.Contains(e.zoneHints, n.Zone)
	}
	return true
}

var classE = netip.MustParsePrefix("240.0.0.0/4")

// isUnicastAddr tells whether a pod could have addr, or a Service be reached at it: a
// unicast address that is not the unspecified, loopback, multicast or class E (reserved,
// including limited broadcast) one.
func isUnicastAddr(addr netip.Addr) bool {
	return !addr.IsUnspecified() && !addr.IsLoopback() && !addr.IsMulticast() && !classE.Contains(addr)
}
