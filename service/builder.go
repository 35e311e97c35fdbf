package service

import (
	"maps"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Builder keeps the Services and EndpointSlices seen so far and the desired frontends each
// Service yields. Every change returns the frontends it may have altered, so the reconciler
// touches only those. It is not safe for concurrent use; the agent feeds it from one
// goroutine.
type Builder struct {
	tr       Translator
	services map[types.NamespacedName]*corev1.Service
	slices   map[types.NamespacedName]map[string]*discoveryv1.EndpointSlice
	owned    map[types.NamespacedName]State
	opts     map[types.NamespacedName]map[Frontend]Options
	owner    map[Frontend]types.NamespacedName
}

// NewBuilder makes a Builder for a node that knows nothing of itself (see Translate).
func NewBuilder() *Builder { return NewBuilderFor(Translator{}) }

// NewBuilderFor makes a Builder that translates with tr (this node, default algorithm).
func NewBuilderFor(tr Translator) *Builder {
	return &Builder{
		tr:       tr,
		opts:     map[types.NamespacedName]map[Frontend]Options{},
		services: map[types.NamespacedName]*corev1.Service{},
		slices:   map[types.NamespacedName]map[string]*discoveryv1.EndpointSlice{},
		owned:    map[types.NamespacedName]State{},
		owner:    map[Frontend]types.NamespacedName{},
	}
}

// Set replaces everything known about one Service: the object (nil when it is gone) and
// all its EndpointSlices. Controllers that read from informer caches use this; the
// per-object methods below suit event streams.
func (b *Builder) Set(nn types.NamespacedName, svc *corev1.Service, eps []*discoveryv1.EndpointSlice) ([]Frontend, error) {
	if svc == nil {
		delete(b.services, nn)
	} else {
		b.services[nn] = svc
	}
	if len(eps) == 0 {
		delete(b.slices, nn)
	} else {
		m := make(map[string]*discoveryv1.EndpointSlice, len(eps))
		for _, s := range eps {
			m[s.Name] = s
		}
		b.slices[nn] = m
	}
	return b.recompute(nn)
}

// UpsertService records a Service (new or changed).
func (b *Builder) UpsertService(svc *corev1.Service) ([]Frontend, error) {
	nn := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
	b.services[nn] = svc
	return b.recompute(nn)
}

// DeleteService forgets a Service; its frontends go.
func (b *Builder) DeleteService(nn types.NamespacedName) []Frontend {
	delete(b.services, nn)
	dirty, _ := b.recompute(nn)
	return dirty
}

// serviceOf names the Service an EndpointSlice belongs to, from the label the
// EndpointSlice controller sets. Slices without it are not for a Service.
func serviceOf(s *discoveryv1.EndpointSlice) (types.NamespacedName, bool) {
	name, ok := s.Labels[discoveryv1.LabelServiceName]
	return types.NamespacedName{Namespace: s.Namespace, Name: name}, ok && name != ""
}

// UpsertSlice records an EndpointSlice (new or changed).
func (b *Builder) UpsertSlice(s *discoveryv1.EndpointSlice) ([]Frontend, error) {
	nn, ok := serviceOf(s)
	if !ok {
		return nil, nil
	}
	if b.slices[nn] == nil {
		b.slices[nn] = map[string]*discoveryv1.EndpointSlice{}
	}
	b.slices[nn][s.Name] = s
	return b.recompute(nn)
}

// DeleteSlice forgets an EndpointSlice.
func (b *Builder) DeleteSlice(s *discoveryv1.EndpointSlice) []Frontend {
	nn, ok := serviceOf(s)
	if !ok {
		return nil
	}
	delete(b.slices[nn], s.Name)
	if len(b.slices[nn]) == 0 {
		delete(b.slices, nn)
	}
	dirty, _ := b.recompute(nn)
	return dirty
}

func (b *Builder) recompute(nn types.NamespacedName) ([]Frontend, error) {
	old, oldOpts := b.owned[nn], b.opts[nn]
	next, nextOpts := State{}, map[Frontend]Options{}
	var err error
	if svc, ok := b.services[nn]; ok {
		eps := make([]*discoveryv1.EndpointSlice, 0, len(b.slices[nn]))
		for _, s := range b.slices[nn] {
			eps = append(eps, s)
		}
		next, nextOpts, err = b.tr.Translate(svc, eps)
	}
	var dirty []Frontend
	for f, bs := range old {
		if nb, ok := next[f]; !ok || !equalBackends(bs, nb) || oldOpts[f] != nextOpts[f] {
			dirty = append(dirty, f)
		}
		if _, ok := next[f]; !ok && b.owner[f] == nn {
			delete(b.owner, f)
		}
	}
	for f := range next {
		if _, ok := old[f]; !ok {
			dirty = append(dirty, f)
		}
		b.owner[f] = nn
	}
	if len(next) == 0 {
		delete(b.owned, nn)
		delete(b.opts, nn)
	} else {
		b.owned[nn] = next
		b.opts[nn] = nextOpts
	}
	return dirty, err
}

func equalBackends(a, b []Backend) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Desired returns the backends a frontend should have, and whether it should exist.
func (b *Builder) Desired(f Frontend) ([]Backend, bool) {
	nn, ok := b.owner[f]
	if !ok {
		return nil, false
	}
	bs, ok := b.owned[nn][f]
	return bs, ok
}

// Options returns how a frontend picks its backends (zero for one that should not exist).
// It is an OptionsLookup.
func (b *Builder) Options(f Frontend) Options {
	nn, ok := b.owner[f]
	if !ok {
		return Options{}
	}
	return b.opts[nn][f]
}

// Len is the number of desired frontends.
func (b *Builder) Len() int { return len(b.owner) }

// Services lists the Services the builder knows.
func (b *Builder) Services() map[types.NamespacedName]bool {
	out := make(map[types.NamespacedName]bool, len(b.services))
	for nn := range b.services {
		out[nn] = true
	}
	return out
}

// State returns the whole desired state (a copy).
func (b *Builder) State() State {
	out := State{}
	for _, st := range b.owned {
		maps.Copy(out, st)
	}
	return out
}
