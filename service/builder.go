package service

import (
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Builder keeps the desired frontends each Service yields. Every change returns the
// frontends it may have altered, so the reconciler touches only those. It is not safe for
// concurrent use; the agent feeds it from one goroutine.
//
// Set translates what it is handed and keeps only the result: a controller reading from
// informer caches already holds the objects, and a second reference per object in the
// builder would keep superseded ones alive. The per-object methods (UpsertService,
// UpsertSlice, ...) suit event streams and keep the objects they were given; use one style or
// the other for a given Service.
type Builder struct {
	tr Translator
	// known: the Services Set or UpsertService was given (Services).
	known map[types.NamespacedName]struct{}
	// services and slices: only what the per-object methods were given.
	services map[types.NamespacedName]*Service
	slices   map[types.NamespacedName]map[string]*Slice
	// owned lists each Service's frontends; desired holds every frontend's backends and
	// options with the Service that owns it. A frontend two Services claim belongs to the
	// last one translated (as before; the API server does not let cluster IPs collide).
	owned   map[types.NamespacedName][]Frontend
	desired map[Frontend]*desiredFrontend
}

type desiredFrontend struct {
	owner    types.NamespacedName
	backends []Backend
	opts     Options
}

// NewBuilder makes a Builder for a node that knows nothing of itself (see Translate).
func NewBuilder() *Builder { return NewBuilderFor(Translator{}) }

// NewBuilderFor makes a Builder that translates with tr (this node, default algorithm).
func NewBuilderFor(tr Translator) *Builder {
	return &Builder{
		tr:       tr,
		known:    map[types.NamespacedName]struct{}{},
		services: map[types.NamespacedName]*Service{},
		slices:   map[types.NamespacedName]map[string]*Slice{},
		owned:    map[types.NamespacedName][]Frontend{},
		desired:  map[Frontend]*desiredFrontend{},
	}
}

// SetTranslator changes what translation knows of the node (its addresses for NodePorts,
// its zone for topology hints). Frontends already built keep their old translation until
// their Service is set again: the caller re-translates everything (the controller's full
// sync does).
func (b *Builder) SetTranslator(tr Translator) { b.tr = tr }

// Set replaces everything known about one Service: the object (nil when it is gone) and
// all its EndpointSlices. Controllers that read from informer caches use this; the
// per-object methods below suit event streams.
func (b *Builder) Set(nn types.NamespacedName, svc *corev1.Service, eps []*discoveryv1.EndpointSlice) ([]Frontend, error) {
	var c *Service
	if svc != nil {
		c = (*Compactor)(nil).Service(svc)
	}
	return b.SetCompact(nn, c, CompactSlices(eps))
}

// SetCompact is Set for compact objects (what the controller's informer caches hold).
func (b *Builder) SetCompact(nn types.NamespacedName, svc *Service, eps []*Slice) ([]Frontend, error) {
	if svc == nil {
		delete(b.known, nn)
	} else {
		b.known[nn] = struct{}{}
	}
	return b.apply(nn, svc, eps)
}

// UpsertService records a Service (new or changed).
func (b *Builder) UpsertService(svc *corev1.Service) ([]Frontend, error) {
	nn := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
	b.services[nn] = (*Compactor)(nil).Service(svc)
	b.known[nn] = struct{}{}
	return b.recompute(nn)
}

// DeleteService forgets a Service; its frontends go.
func (b *Builder) DeleteService(nn types.NamespacedName) []Frontend {
	delete(b.services, nn)
	delete(b.known, nn)
	dirty, _ := b.recompute(nn)
	return dirty
}

// UpsertSlice records an EndpointSlice (new or changed).
// Slices without the kubernetes.io/service-name label are not for a Service.
func (b *Builder) UpsertSlice(s *discoveryv1.EndpointSlice) ([]Frontend, error) {
	c := (*Compactor)(nil).Slice(s)
	nn, ok := c.Key()
	if !ok {
		return nil, nil
	}
	if b.slices[nn] == nil {
		b.slices[nn] = map[string]*Slice{}
	}
	b.slices[nn][s.Name] = c
	return b.recompute(nn)
}

// DeleteSlice forgets an EndpointSlice.
func (b *Builder) DeleteSlice(s *discoveryv1.EndpointSlice) []Frontend {
	nn, ok := (&Slice{Namespace: s.Namespace, Service: s.Labels[discoveryv1.LabelServiceName]}).Key()
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

// recompute translates a Service from what the per-object methods recorded.
func (b *Builder) recompute(nn types.NamespacedName) ([]Frontend, error) {
	svc := b.services[nn]
	eps := make([]*Slice, 0, len(b.slices[nn]))
	for _, s := range b.slices[nn] {
		eps = append(eps, s)
	}
	return b.apply(nn, svc, eps)
}

// apply translates one Service (svc nil: it is gone) and stores the result, returning the
// frontends that appeared, went or changed.
func (b *Builder) apply(nn types.NamespacedName, svc *Service, eps []*Slice) ([]Frontend, error) {
	next, nextOpts := State{}, map[Frontend]Options{}
	var err error
	if svc != nil {
		next, nextOpts, err = b.tr.TranslateCompact(svc, eps)
	}
	var dirty []Frontend
	old := b.owned[nn]
	for _, f := range old {
		d := b.desired[f]
		if d == nil || d.owner != nn {
			continue // claimed since by another Service
		}
		nb, ok := next[f]
		if !ok || !equalBackends(d.backends, nb) || d.opts != nextOpts[f] {
			dirty = append(dirty, f)
		}
		if !ok {
			delete(b.desired, f)
		}
	}
	var fronts []Frontend
	if len(next) > 0 {
		fronts = make([]Frontend, 0, len(next))
	}
	for f, bs := range next {
		fronts = append(fronts, f)
		d := b.desired[f]
		if d == nil || d.owner != nn {
			if !slices.Contains(dirty, f) {
				dirty = append(dirty, f)
			}
			d = &desiredFrontend{owner: nn}
			b.desired[f] = d
		}
		d.backends, d.opts = bs, nextOpts[f]
	}
	if len(fronts) == 0 {
		delete(b.owned, nn)
	} else {
		b.owned[nn] = fronts
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
	d, ok := b.desired[f]
	if !ok {
		return nil, false
	}
	return d.backends, true
}

// Options returns how a frontend picks its backends (zero for one that should not exist).
// It is an OptionsLookup.
func (b *Builder) Options(f Frontend) Options {
	if d, ok := b.desired[f]; ok {
		return d.opts
	}
	return Options{}
}

// Len is the number of desired frontends.
func (b *Builder) Len() int { return len(b.desired) }

// Services lists the Services the builder knows.
func (b *Builder) Services() map[types.NamespacedName]bool {
	out := make(map[types.NamespacedName]bool, len(b.known))
	for nn := range b.known {
		out[nn] = true
	}
	return out
}

// State returns the whole desired state (a copy).
func (b *Builder) State() State {
	out := make(State, len(b.desired))
	for f, d := range b.desired {
		out[f] = d.backends
	}
	return out
}
