package service

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Options say how a frontend chooses among its backends, beyond the list itself. The zero
// value is kube-proxy's default: a random backend per new flow, reject when there is none.
type Options struct {
	// AffinitySeconds is sessionAffinity ClientIP's timeout: a client's new flows go to the
	// backend its last flow got, until it opened none for this long. 0: no affinity.
	AffinitySeconds uint32
	// MaglevSize, when not 0, makes the frontend pick its backend by a consistent hash of
	// the flow's 5-tuple into a Maglev table of this many entries (see Maglev), so that a
	// backend change moves few flows, instead of at random.
	MaglevSize uint32
	// DropWhenEmpty: the frontend has no backends because its traffic policy left none on
	// this node (internalTrafficPolicy: Local) while the Service has some elsewhere;
	// kube-proxy drops such packets silently instead of rejecting them.
	DropWhenEmpty bool
	// Kind says which part of the Service the frontend is: its cluster IP, a NodePort on a
	// node address, a LoadBalancer ingress IP or an externalIP. Every kind but ClusterIP is
	// external: the netdev programs serve it to clients outside the node too.
	Kind Kind
	// SourceRanges is a LoadBalancer IP frontend's loadBalancerSourceRanges, canonical
	// (masked, sorted, comma-separated; Prefixes reads it back); "" lets every client in.
	// A string so that Options stay comparable.
	SourceRanges string
	// ExternalLocal: externalTrafficPolicy Local on an external frontend, which then has an
	// Internal twin with every endpoint for in-cluster clients.
	ExternalLocal bool
}

// Kind is the part of a Service a frontend comes from.
type Kind uint8

const (
	KindClusterIP Kind = iota
	KindNodePort
	KindLoadBalancer
	KindExternalIP
	// KindHostPort is a pod's hostPort (the CNI portMappings capability), not a Service's:
	// external, with the pod as its one backend.
	KindHostPort
)

func (k Kind) String() string {
	switch k {
	case KindClusterIP:
		return "ClusterIP"
	case KindNodePort:
		return "NodePort"
	case KindLoadBalancer:
		return "LoadBalancer"
	case KindExternalIP:
		return "ExternalIP"
	case KindHostPort:
		return "HostPort"
	}
	return fmt.Sprintf("kind-%d", uint8(k))
}

// External tells whether clients outside the node reach the frontend through the netdevs.
func (k Kind) External() bool { return k != KindClusterIP }

// Prefixes reads SourceRanges back; it was written by Translate, so it parses.
func (o Options) Prefixes() []netip.Prefix {
	if o.SourceRanges == "" {
		return nil
	}
	var out []netip.Prefix
	for _, s := range strings.Split(o.SourceRanges, ",") {
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// canonicalRanges turns loadBalancerSourceRanges into Options.SourceRanges: IPv4 CIDRs,
// masked, sorted, without duplicates. A range that does not parse is reported and left
// out; IPv6 ranges are left out (the datapath is IPv4 only). When the Service has ranges
// but none is usable the result is "0.0.0.0/32" (nobody) rather than "" (everybody): an
// operator who restricted a Service must not find it opened by a typo.
func canonicalRanges(ranges []string) (string, error) {
	if len(ranges) == 0 {
		return "", nil
	}
	var (
		ps   []netip.Prefix
		errs []error
		any6 bool
	)
	for _, r := range ranges {
		p, err := netip.ParsePrefix(strings.TrimSpace(r))
		if err != nil {
			errs = append(errs, fmt.Errorf("loadBalancerSourceRanges entry %q: %w", r, err))
			continue
		}
		if !p.Addr().Is4() {
			any6 = true
			continue
		}
		ps = append(ps, p.Masked())
	}
	if len(ps) == 0 {
		if any6 && len(errs) == 0 {
			return "0.0.0.0/32", nil
		}
		return "0.0.0.0/32", errors.Join(errs...)
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	ps = slices.Compact(ps)
	parts := make([]string, len(ps))
	for i, p := range ps {
		parts[i] = p.String()
	}
	return strings.Join(parts, ","), errors.Join(errs...)
}

// DefaultAffinitySeconds is Kubernetes' default for
// sessionAffinityConfig.clientIP.timeoutSeconds.
const DefaultAffinitySeconds = 10800

// Annotations choosing a Service's load-balancing algorithm. Cilium's spelling is accepted
// so that Services written for Cilium keep their algorithm; tern's own spelling wins when a
// Service carries both.
const (
	AnnotationLBAlgorithm       = "service.tern.io/lb-algorithm"
	AnnotationCiliumLBAlgorithm = "service.cilium.io/lb-algorithm"
)

// Algorithm is a backend selection algorithm, spelt as in the annotation.
type Algorithm string

const (
	AlgorithmRandom Algorithm = "random"
	AlgorithmMaglev Algorithm = "maglev"
)

// ParseAlgorithm reads an algorithm name as the annotation or the node option spells it.
func ParseAlgorithm(s string) (Algorithm, error) {
	switch a := Algorithm(strings.ToLower(strings.TrimSpace(s))); a {
	case AlgorithmRandom, AlgorithmMaglev:
		return a, nil
	}
	return "", fmt.Errorf("unknown load-balancing algorithm %q (want %q or %q)", s, AlgorithmRandom, AlgorithmMaglev)
}

// OptionsLookup answers the options of a frontend; Builder.Options is one.
type OptionsLookup func(Frontend) Options

// Node is what Translate needs to know about the node it programs: which endpoints are
// local (internalTrafficPolicy: Local, node hints) and which zone hints apply to it.
type Node struct {
	Name string // the Node object's name, compared with an endpoint's nodeName
	Zone string // its topology.kubernetes.io/zone label, "" when it has none
	// Addrs are the node addresses NodePorts are served on (kube-proxy's default
	// nodePortAddresses: the node's own addresses). Only IPv4 ones are used. One frontend per
	// address and NodePort: the pod and socket programs find it with the same lookup as a
	// ClusterIP, and the netdev programs need no address list of their own.
	Addrs []netip.Addr
	// Exclusive are the addresses of this node's exclusive-ENI pods. They are no
	// externalTrafficPolicy Local backends here: such a pod answers an external client
	// through its own ENI, past the node, so a flow that keeps the client's address gets no
	// answer (docs/architecture.md, "Exclusive-ENI pods"). Every other frontend, NodePorts
	// with externalTrafficPolicy Cluster included, uses them.
	Exclusive []netip.Addr
}

// Translator holds what translation depends on besides the Service itself.
type Translator struct {
	Node Node
	// DefaultAlgorithm applies to Services without the annotation; "" is random.
	DefaultAlgorithm Algorithm
	// MaglevTableSize fixes every Maglev table's size (one of MaglevPrimes); 0 sizes each
	// by its backends (MaglevSize).
	MaglevTableSize uint32
}

// serviceOptions is a Service's per-frontend options: affinity and algorithm (the
// Compactor read them; the node default applies where the Service names none).
func (tr Translator) serviceOptions(svc *Service) Options {
	o := Options{AffinitySeconds: svc.AffinitySeconds}
	algo := tr.DefaultAlgorithm
	if a := svc.Algorithm(); a != "" {
		algo = a
	}
	if algo == AlgorithmMaglev {
		o.MaglevSize = 1 // sized per port once its backends are known (Translate)
	}
	return o
}
