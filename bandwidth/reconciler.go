package bandwidth

import (
	"errors"
	"fmt"
	"sync"

	"github.com/tern-net/tern/loader"
)

// Maps is the kernel seam of the reconciler; loader.Maps implements it.
type Maps interface {
	DumpBandwidth() (map[loader.BWKey]loader.BWValue, error)
	PutBandwidth(loader.BWKey, loader.BWValue) error
	DeleteBandwidth(loader.BWKey) error
}

// Reconciler owns the limits in tern_bandwidth, keyed by the pod's host veth. It mirrors
// what it wrote and writes an entry only when its limits change: a write resets the
// programs' schedule for the pod (a full bucket), which an unchanged limit must not do.
type Reconciler struct {
	maps Maps
	mode Mode // how egress is encoded (EDT: a horizon; policer: a bucket)

	mu     sync.Mutex
	mirror map[int]loader.BWValue // limits only, the state fields zero
}

// NewReconciler starts from what the map holds (a previous agent's entries, still enforced).
// mode is the node's (the programs were loaded for it).
func NewReconciler(m Maps, mode Mode) (*Reconciler, error) {
	cur, err := m.DumpBandwidth()
	if err != nil {
		return nil, fmt.Errorf("read bandwidth map: %w", err)
	}
	r := &Reconciler{maps: m, mode: mode, mirror: make(map[int]loader.BWValue, len(cur))}
	for k, v := range cur {
		r.mirror[int(k.Ifindex)] = limitsOnly(v)
	}
	return r, nil
}

func limitsOnly(v loader.BWValue) loader.BWValue {
	v.Egress.Next, v.Ingress.Next = 0, 0
	return v
}

// Apply makes the map hold exactly want (host veth ifindex → limits): it writes what
// changed and deletes entries not in want. Every failure is reported; the rest is applied.
func (r *Reconciler) Apply(want map[int]Limits) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for ifindex, l := range want {
		v := l.value(r.mode)
		if old, ok := r.mirror[ifindex]; ok && old == v {
			continue
		}
		if err := r.maps.PutBandwidth(loader.BWKey{Ifindex: uint32(ifindex)}, v); err != nil {
			errs = append(errs, fmt.Errorf("write bandwidth limits of the pod on ifindex %d: %w", ifindex, err))
			continue
		}
		r.mirror[ifindex] = v
	}
	for ifindex := range r.mirror {
		if _, ok := want[ifindex]; ok {
			continue
		}
		if err := r.maps.DeleteBandwidth(loader.BWKey{Ifindex: uint32(ifindex)}); err != nil && !loader.IsNotExist(err) {
			errs = append(errs, fmt.Errorf("delete bandwidth limits of ifindex %d: %w", ifindex, err))
			continue
		}
		delete(r.mirror, ifindex)
	}
	return errors.Join(errs...)
}

// Delete forgets ifindex's limits at once (its veth is being detached; the index may be
// reused by the next pod).
func (r *Reconciler) Delete(ifindex int) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.mirror[ifindex]; !ok {
		return nil
	}
	if err := r.maps.DeleteBandwidth(loader.BWKey{Ifindex: uint32(ifindex)}); err != nil && !loader.IsNotExist(err) {
		return fmt.Errorf("delete bandwidth limits of ifindex %d: %w", ifindex, err)
	}
	delete(r.mirror, ifindex)
	return nil
}

// Len is how many pods have limits in the map.
func (r *Reconciler) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.mirror)
}
