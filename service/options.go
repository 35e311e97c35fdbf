package service

import (
	"errors"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
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

// serviceOptions reads a Service's per-frontend options: affinity and algorithm.
func (tr Translator) serviceOptions(svc *corev1.Service) (Options, error) {
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
