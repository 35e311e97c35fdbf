package endpoint

import (
	"errors"
	"net/netip"

	"github.com/tern-net/tern/loader"
)

// PolicyFunc is NetworkPolicy's view of a local pod: its identity, and whether policy is
// enforced on it. pod is "namespace/name" when the attach named it ("" for endpoints found
// in the map after a restart: then addr decides).
type PolicyFunc func(pod string, addr netip.Addr) (identity uint32, enforce bool)

// SetPolicy makes fn the source of every endpoint's identity and EP_F_POLICY flag, and
// applies it now to the endpoints recorded; Upsert applies it to every later one, so a pod
// attached between two policy syncs still gets the identity its name already has.
func (r *Registry) SetPolicy(fn PolicyFunc) error {
	r.mu.Lock()
	r.policy = fn
	var eps []Endpoint
	for ifindex, v := range r.mirror {
		e := Endpoint{IfIndex: ifindex, Addr: loader.BEToAddr(v.Addr), Flags: v.Flags, Identity: v.Identity,
			BWSlot: v.BwSlot, Pod: r.pods[ifindex]}
		if v.Mac != ([6]byte{}) {
			e.MAC = append([]byte(nil), v.Mac[:]...)
		}
		eps = append(eps, e)
	}
	r.mu.Unlock()
	var errs []error
	for _, e := range eps {
		errs = append(errs, r.Upsert(e))
	}
	return errors.Join(errs...)
}

func (r *Registry) applyPolicyLocked(e *Endpoint) {
	if r.policy == nil {
		return
	}
	id, enforce := r.policy(e.Pod, e.Addr)
	e.Identity = id
	if enforce {
		e.Flags |= loader.EndpointFlagPolicy
	} else {
		e.Flags &^= loader.EndpointFlagPolicy
	}
}

// Cache is the ipcache reconciler the registry writes local pods into; NetworkPolicy
// writes the other pods of the cluster through it.
func (r *Registry) Cache() *IPCache { return r.cache }

// PodAddrs lists the /32 entries marked as pods that are not local (written for the pods of
// other nodes), so that a restarted agent can remove the ones whose pods left while it was
// away.
func (c *IPCache) PodAddrs() []netip.Addr {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []netip.Addr
	for p, v := range c.mirror {
		if p.Bits() == 32 && v.Flags&loader.IPCacheFlagPod != 0 && v.Flags&loader.IPCacheFlagLocal == 0 {
			out = append(out, p.Addr())
		}
	}
	return out
}
