package service

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Service is what tern keeps of a Kubernetes Service: exactly what translation, the
// health-check servers and Events read, already parsed. At 10,000 Services the informer
// caches are most of the agent's memory; a corev1.Service costs 640 bytes before its strings
// even with every field tern does not read emptied, this a fraction of it. A Compactor makes
// them; they are read-only once made (informer caches share them between goroutines).
//
// What could not be read (a bad cluster IP, an unknown protocol, an out-of-range timeout)
// is kept as the error Translate reports, in the order it reports them, so a compact
// Service translates to exactly what its API object did (TestCompactTranslatesAsAPI).
type Service struct {
	Namespace, Name string // Namespace interned
	UID             types.UID
	ResourceVersion string // UID and ResourceVersion: Events name them

	ClusterIPs          []netip.Addr // IPv4 only, in the Service's order
	Ports               []Port
	AffinitySeconds     uint32 // 0: no ClientIP affinity
	HealthCheckNodePort uint16 // 0 unless type LoadBalancer, eTP Local (healthcheck.Port)
	flags               svcFlags
	// more holds what most Services do not have, so that they do not pay for it.
	more *serviceMore
}

// serviceMore is the part of a Service few have: external addresses, source ranges, and
// what could not be read.
type serviceMore struct {
	lbIPs, extIPs []netip.Addr // IPv4 LoadBalancer ingress (not ipMode Proxy) and externalIPs
	sourceRanges  string       // canonicalRanges of loadBalancerSourceRanges
	errs          []error      // service-level read errors, in Translate's order
	portErrs      []error      // Port.errAt - 1 indexes these
}

type svcFlags uint8

const (
	svcExternalName svcFlags = 1 << iota
	svcHeadless
	svcNodePorts // type NodePort or LoadBalancer
	svcInternalLocal
	svcExternalLocal
	svcAlgoRandom // the annotations ask for random
	svcAlgoMaglev // the annotations ask for Maglev
)

// Algorithm is what the Service's annotations ask for, "" when they ask nothing (the node
// default applies).
func (s *Service) Algorithm() Algorithm {
	switch {
	case s.flags&svcAlgoMaglev != 0:
		return AlgorithmMaglev
	case s.flags&svcAlgoRandom != 0:
		return AlgorithmRandom
	}
	return ""
}

// LoadBalancerIPs are the IPv4 LoadBalancer ingress IPs (type LoadBalancer only, not those
// in ipMode Proxy); ExternalIPs the IPv4 externalIPs; SourceRanges the canonical
// loadBalancerSourceRanges (Options.SourceRanges).
func (s *Service) LoadBalancerIPs() []netip.Addr { return s.m().lbIPs }
func (s *Service) ExternalIPs() []netip.Addr     { return s.m().extIPs }
func (s *Service) SourceRanges() string          { return s.m().sourceRanges }

func (s *Service) m() serviceMore {
	if s.more == nil {
		return serviceMore{}
	}
	return *s.more
}

// Port is one Service port. errAt, when not 0, says why it yields no frontend
// (serviceMore.portErrs[errAt-1]).
type Port struct {
	Name     string
	Port     uint16
	NodePort uint16 // 0: none (or out of range)
	Proto    Protocol
	errAt    uint16
}

func (s *Service) portErr(p *Port) error {
	if p.errAt == 0 {
		return nil
	}
	return s.more.portErrs[p.errAt-1]
}

// Key is the Service's namespace and name.
func (s *Service) Key() types.NamespacedName {
	return types.NamespacedName{Namespace: s.Namespace, Name: s.Name}
}

// ExternalLocal tells whether externalTrafficPolicy is Local.
func (s *Service) ExternalLocal() bool { return s.flags&svcExternalLocal != 0 }

// Ref names the Service for an Event (record.EventRecorder takes an ObjectReference).
func (s *Service) Ref() *corev1.ObjectReference {
	return &corev1.ObjectReference{Kind: "Service", APIVersion: "v1", Namespace: s.Namespace, Name: s.Name,
		UID: s.UID, ResourceVersion: s.ResourceVersion}
}

// GetObjectMeta lets informer stores key the object (cache.MetaNamespaceKeyFunc).
func (s *Service) GetObjectMeta() metav1.Object {
	return &metav1.ObjectMeta{Namespace: s.Namespace, Name: s.Name, UID: s.UID, ResourceVersion: s.ResourceVersion}
}

// Slice is what tern keeps of an EndpointSlice: the IPv4 slices' ports and endpoints as
// translation and the health checks read them. Other address families keep no endpoints.
type Slice struct {
	Namespace, Name string // Namespace interned
	Service         string // the kubernetes.io/service-name label, "" for none
	IPv4            bool   // addressType IPv4; translation ignores the others
	Ports           []SlicePort
	Endpoints       []Endpoint
}

// SlicePort is an EndpointSlice port with a number (ports without one, or out of range,
// are dropped: nothing can be sent to them). Proto is 0 for a protocol tern does not serve.
type SlicePort struct {
	Name  string
	Port  uint16
	Proto Protocol
}

// Endpoint is one endpoint of a slice: its first usable address inline (almost every
// endpoint has exactly one), its node (interned) and conditions, and the rare rest.
type Endpoint struct {
	Addr  [4]byte
	flags epFlags
	Node  string // nodeName, interned; "" for none
	more  *endpointMore
}

type epFlags uint8

const (
	epHasAddr     epFlags = 1 << iota // Addr is set
	epReady                           // ready, or not said (the API's default)
	epServing                         // serving, or not said
	epTerminating                     // terminating said true
)

// endpointMore holds what few endpoints have: further addresses, addresses no backend can
// have (reported by Translate), topology hints (interned).
type endpointMore struct {
	addrs                [][4]byte
	bad                  []string
	zoneHints, nodeHints []string
}

// Ready, Serving and Terminating read the conditions as the API defines them.
func (e *Endpoint) Ready() bool       { return e.flags&epReady != 0 }
func (e *Endpoint) Serving() bool     { return e.flags&epServing != 0 }
func (e *Endpoint) Terminating() bool { return e.flags&epTerminating != 0 }

// Addrs lists the endpoint's usable IPv4 addresses.
func (e *Endpoint) Addrs() []netip.Addr {
	var out []netip.Addr
	if e.flags&epHasAddr != 0 {
		out = append(out, netip.AddrFrom4(e.Addr))
	}
	if e.more != nil {
		for _, a := range e.more.addrs {
			out = append(out, netip.AddrFrom4(a))
		}
	}
	return out
}

// BadAddrs lists the endpoint's addresses no backend can have, as written.
func (e *Endpoint) BadAddrs() []string {
	if e.more == nil {
		return nil
	}
	return e.more.bad
}

// Key is the slice's Service, ok false when it has none.
func (s *Slice) Key() (types.NamespacedName, bool) {
	return types.NamespacedName{Namespace: s.Namespace, Name: s.Service}, s.Service != ""
}

// GetObjectMeta lets informer stores key the object (cache.MetaNamespaceKeyFunc).
func (s *Slice) GetObjectMeta() metav1.Object {
	return &metav1.ObjectMeta{Namespace: s.Namespace, Name: s.Name}
}

// Compactor turns API objects into compact ones, sharing one copy of the strings that
// repeat across objects (namespaces, node names, zone hints). Safe for concurrent use: the
// two informers' transforms run on their own goroutines.
type Compactor struct {
	mu   sync.Mutex
	strs map[string]string
	max  int
}

// NewCompactor makes a Compactor. Namespaces and node names are a few thousand at most; the
// bound only keeps a misbehaving writer (random node names) from growing the table forever.
func NewCompactor() *Compactor { return &Compactor{strs: map[string]string{}, max: 1 << 16} }

// intern returns the shared copy of s. A nil Compactor shares nothing.
func (c *Compactor) intern(s string) string {
	if c == nil || s == "" {
		return s
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if q, ok := c.strs[s]; ok {
		return q
	}
	if len(c.strs) < c.max {
		c.strs[s] = s
	}
	return s
}

// Service reads a Service. A nil Compactor works and shares nothing.
func (c *Compactor) Service(svc *corev1.Service) *Service {
	out := &Service{Namespace: c.intern(svc.Namespace), Name: svc.Name, UID: svc.UID, ResourceVersion: svc.ResourceVersion}
	sp := &svc.Spec
	switch sp.Type {
	case corev1.ServiceTypeExternalName:
		out.flags |= svcExternalName
		return out // no frontends: nothing else is read
	case corev1.ServiceTypeNodePort:
		out.flags |= svcNodePorts
	case corev1.ServiceTypeLoadBalancer:
		out.flags |= svcNodePorts
		if sp.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal &&
			sp.HealthCheckNodePort > 0 && sp.HealthCheckNodePort <= 65535 {
			out.HealthCheckNodePort = uint16(sp.HealthCheckNodePort)
		}
	}
	if sp.InternalTrafficPolicy != nil && *sp.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal {
		out.flags |= svcInternalLocal
	}
	if sp.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal {
		out.flags |= svcExternalLocal
	}
	ips := sp.ClusterIPs
	if len(ips) == 0 && sp.ClusterIP != "" {
		ips = []string{sp.ClusterIP}
	}
	var more serviceMore
	for _, s := range ips {
		if s == corev1.ClusterIPNone {
			// Headless: no frontends and, as before, no complaint about the rest.
			return &Service{Namespace: out.Namespace, Name: out.Name, UID: out.UID,
				ResourceVersion: out.ResourceVersion, flags: out.flags | svcHeadless}
		}
		if a, ok, err := frontendAddr("cluster IP", s); err != nil {
			more.errs = append(more.errs, err)
		} else if ok {
			out.ClusterIPs = append(out.ClusterIPs, a)
		}
	}
	if err := out.readOptions(svc); err != nil {
		more.errs = append(more.errs, err)
	}
	var ipErrs []error
	more.lbIPs, more.extIPs, ipErrs = externalAddrs(svc)
	more.errs = append(more.errs, ipErrs...)
	var err error
	if more.sourceRanges, err = canonicalRanges(sp.LoadBalancerSourceRanges); err != nil {
		more.errs = append(more.errs, err)
	}
	if len(sp.Ports) > 0 {
		out.Ports = make([]Port, len(sp.Ports))
	}
	for i, p := range sp.Ports {
		q := Port{Name: p.Name}
		proto, err := protocolOf(p.Protocol)
		switch {
		case err != nil:
			more.portErrs = append(more.portErrs, fmt.Errorf("port %q: %w", p.Name, err))
		case p.Port <= 0 || p.Port > 65535:
			more.portErrs = append(more.portErrs, fmt.Errorf("port %q: number %d out of range 1-65535", p.Name, p.Port))
		default:
			q.Port, q.Proto = uint16(p.Port), proto
			if p.NodePort > 0 && p.NodePort <= 65535 {
				q.NodePort = uint16(p.NodePort)
			}
		}
		if q.Port == 0 {
			q.errAt = uint16(len(more.portErrs)) // ports are at most a few hundred
		}
		out.Ports[i] = q
	}
	if more.lbIPs != nil || more.extIPs != nil || more.sourceRanges != "" || more.errs != nil || more.portErrs != nil {
		out.more = &more
	}
	return out
}

// readOptions reads affinity and the algorithm annotations, reporting what it cannot read
// as serviceOptions did before it moved here.
func (s *Service) readOptions(svc *corev1.Service) error {
	var errs []error
	if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		s.AffinitySeconds = DefaultAffinitySeconds
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			// The apiserver validates 1..86400; anything else falls back to the default.
			if t := *c.ClientIP.TimeoutSeconds; t > 0 && t <= 86400 {
				s.AffinitySeconds = uint32(t)
			} else {
				errs = append(errs, fmt.Errorf("sessionAffinityConfig.clientIP.timeoutSeconds %d out of range 1-86400; using %d", t, DefaultAffinitySeconds))
			}
		}
	}
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
		if a == AlgorithmMaglev {
			s.flags |= svcAlgoMaglev
		} else {
			s.flags |= svcAlgoRandom
		}
		break
	}
	return errors.Join(errs...)
}

// externalAddrs reads a Service's LoadBalancer ingress IPs (type LoadBalancer only, and
// not those whose ipMode is Proxy: kube-proxy leaves those to the load balancer) and its
// externalIPs, IPv4 only.
func externalAddrs(svc *corev1.Service) (lb, ext []netip.Addr, errs []error) {
	if svc.Spec.Type == corev1.ServiceTypeLoadBalancer {
		for _, in := range svc.Status.LoadBalancer.Ingress {
			if in.IP == "" || (in.IPMode != nil && *in.IPMode == corev1.LoadBalancerIPModeProxy) {
				continue
			}
			if a, ok, err := frontendAddr("load balancer ingress IP", in.IP); err != nil {
				errs = append(errs, err)
			} else if ok {
				lb = append(lb, a)
			}
		}
	}
	for _, s := range svc.Spec.ExternalIPs {
		if a, ok, err := frontendAddr("external IP", s); err != nil {
			errs = append(errs, err)
		} else if ok {
			ext = append(ext, a)
		}
	}
	return lb, ext, errs
}

// frontendAddr parses one of a Service's own addresses (a cluster IP, LoadBalancer ingress IP
// or externalIP); ok says it gets frontends. An IPv6 address is passed over (tern serves
// IPv4). One that is not unicast is refused with an error naming it: a frontend at the
// unspecified or a loopback address would capture the node's own connections to itself
// (connect to 0.0.0.0 or 127.0.0.1 reaches the node), and the apiserver's checks (a cluster
// IP from the Service range, externalIPs not special) may be off or bypassed. The fuzzer
// found a Service with cluster IP 0.0.0.0 given a frontend.
func frontendAddr(what, s string) (a netip.Addr, ok bool, err error) {
	a, err = netip.ParseAddr(s)
	switch {
	case err != nil:
		return netip.Addr{}, false, fmt.Errorf("%s %q: %w", what, s, err)
	case !a.Is4():
		return a, false, nil
	case !isUnicastAddr(a):
		return a, false, fmt.Errorf("%s %s is not a unicast address (it is unspecified, loopback, multicast or reserved); it gets no frontend", what, a)
	}
	return a, true, nil
}

// Slice reads an EndpointSlice. A nil Compactor works and shares nothing.
func (c *Compactor) Slice(s *discoveryv1.EndpointSlice) *Slice {
	out := &Slice{Namespace: c.intern(s.Namespace), Name: s.Name, Service: s.Labels[discoveryv1.LabelServiceName],
		IPv4: s.AddressType == discoveryv1.AddressTypeIPv4}
	if !out.IPv4 {
		return out
	}
	for _, p := range s.Ports {
		if p.Port == nil || *p.Port <= 0 || *p.Port > 65535 {
			continue
		}
		q := SlicePort{Port: uint16(*p.Port), Proto: TCP}
		if p.Name != nil {
			q.Name = *p.Name
		}
		if p.Protocol != nil {
			var err error
			if q.Proto, err = protocolOf(*p.Protocol); err != nil || *p.Protocol == "" {
				q.Proto = 0 // matches no Service port (an empty one did not either)
			}
		}
		out.Ports = append(out.Ports, q)
	}
	out.Endpoints = make([]Endpoint, 0, len(s.Endpoints))
	for i := range s.Endpoints {
		e := &s.Endpoints[i]
		var q Endpoint
		if cd := e.Conditions; cd.Ready == nil || *cd.Ready {
			q.flags |= epReady
		}
		if cd := e.Conditions; cd.Serving == nil || *cd.Serving {
			q.flags |= epServing
		}
		if cd := e.Conditions; cd.Terminating != nil && *cd.Terminating {
			q.flags |= epTerminating
		}
		if e.NodeName != nil {
			q.Node = c.intern(*e.NodeName)
		}
		var more endpointMore
		for _, a := range e.Addresses {
			addr, err := netip.ParseAddr(a)
			switch {
			case err != nil || !addr.Is4() || !isUnicastAddr(addr):
				more.bad = append(more.bad, a)
			case q.flags&epHasAddr == 0:
				q.Addr, q.flags = addr.As4(), q.flags|epHasAddr
			default:
				more.addrs = append(more.addrs, addr.As4())
			}
		}
		if e.Hints != nil {
			for _, z := range e.Hints.ForZones {
				more.zoneHints = append(more.zoneHints, c.intern(z.Name))
			}
			for _, n := range e.Hints.ForNodes {
				more.nodeHints = append(more.nodeHints, c.intern(n.Name))
			}
		}
		if more.addrs != nil || more.bad != nil || more.zoneHints != nil || more.nodeHints != nil {
			q.more = &more
		}
		out.Endpoints = append(out.Endpoints, q)
	}
	return out
}

// CompactSlices reads EndpointSlices without sharing strings (tests, one-off translation).
func CompactSlices(eps []*discoveryv1.EndpointSlice) []*Slice {
	out := make([]*Slice, len(eps))
	for i, s := range eps {
		out[i] = (*Compactor)(nil).Slice(s)
	}
	return out
}
