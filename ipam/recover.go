package ipam

import (
	"context"
	"net/netip"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam/store"
)

// A start on an empty store adopts the node's attached ENIs at once (reconcile.go). Their
// addresses are idle only if the node's pods died with the store (a new disk). When the store
// alone was lost (deleted by hand, a state directory mounted from a new volume) the pods still
// run with those addresses, and an idle one would be handed to a second pod. So the pool asks
// Options.LivePods which of them live pods hold, records those as the pods' allocations, and
// until that source has answered holds every recovered address: not idle, not reclaimed, not
// handed out.

// LivePodsFunc names the addresses live pods on this node hold, by address. It is asked only
// after a start on an empty store. An error means the source cannot answer yet (the apiserver
// is unreachable): the pool holds the recovered addresses and asks again later.
type LivePodsFunc func(ctx context.Context) (map[netip.Addr]PodKey, error)

// recoveringOwner is the owner of an address held until the live-pod source answers. No
// allocation key has it (a key is namespace/name/containerID, with two slashes), so nothing
// hands it out, reclaims it or takes it over, and p.allocs has no entry for it.
const recoveringOwner = "(held: live pods not known yet)"

// liveAskTimeout bounds one question to the live-pod source, so a hung apiserver cannot hold
// Start or the maintenance loop.
const liveAskTimeout = 10 * time.Second

// metaRecovering, in the store's meta, marks a recovery from an empty store under way: set
// before the first ENI is adopted, cleared with the live pods' allocations. A Start that finds
// it (the agent died, or Start failed, in between) holds again instead of taking the adopted
// addresses for idle.
const metaRecovering = "recovering-live-pods"

// holdRecoveredLocked holds every idle address until the live-pod source has answered. It
// runs at Start only, when every ENI the pool has is adopted (or, resuming, was adopted or
// created while held: an address of the latter is idle again once the source has answered).
func (p *Pool) holdRecoveredLocked() {
	p.recovering = true
	for _, e := range p.enis {
		for _, ip := range e.ips {
			if ip.owner == "" && !ip.releasing {
				ip.owner = recoveringOwner
			}
		}
	}
	p.publishLocked()
}

// recoverLivePods asks the live-pod source and turns each held address a live pod holds into
// that pod's allocation; the rest become idle. When the source cannot answer, everything stays
// held and the maintenance loop asks again. It runs with opMu held.
func (p *Pool) recoverLivePods(ctx context.Context) {
	p.mu.Lock()
	pending := p.recovering
	held := 0
	for _, e := range p.enis {
		for _, ip := range e.ips {
			if ip.owner == recoveringOwner {
				held++
			}
		}
	}
	p.mu.Unlock()
	if !pending {
		return
	}
	actx, cancel := context.WithTimeout(ctx, liveAskTimeout)
	live, err := p.opts.LivePods(actx)
	cancel()
	if err != nil {
		p.log.Warn("the IPAM store was empty and the node's live pods are not known yet: holding the recovered ENIs' addresses (none is handed out) until they are",
			zap.Int("heldIPs", held), zap.Error(err))
		p.scheduleVerify()
		return
	}
	now := p.now()
	var recs []store.Allocation
	p.mu.Lock()
	for _, e := range p.enis {
		for a, ip := range e.ips {
			if ip.owner != recoveringOwner {
				continue
			}
			key, ok := live[a]
			if !ok || key.Namespace == "" || key.Name == "" {
				continue
			}
			if _, dup := p.allocs[key.key()]; dup || slices.ContainsFunc(recs, func(r store.Allocation) bool { return r.Key() == key.key() }) {
				// One allocation per pod: a source naming a pod at two addresses has one stale.
				p.log.Warn("the live-pod source names a pod at more than one address; recovering one", zap.String("pod", key.key()), zap.Stringer("ip", a))
				continue
			}
			recs = append(recs, store.Allocation{Namespace: key.Namespace, Name: key.Name, ContainerID: key.ContainerID,
				IP: a, ENIID: e.info.ID, Allocated: now})
		}
	}
	p.mu.Unlock()
	if err := p.st.Update(func(tx *store.Tx) error {
		for _, r := range recs {
			if err := tx.PutAllocation(r); err != nil {
				return err
			}
		}
		return tx.SetMeta(metaRecovering, "")
	}); err != nil {
		p.log.Error("cannot record the live pods' recovered allocations; holding their addresses and retrying", zap.Error(err))
		p.scheduleVerify()
		return
	}
	p.mu.Lock()
	for _, r := range recs {
		e := p.enis[r.ENIID]
		ip := e.ips[r.IP]
		ip.owner = r.Key()
		ready := make(chan struct{})
		close(ready)
		p.allocs[r.Key()] = &allocState{key: PodKey{Namespace: r.Namespace, Name: r.Name, ContainerID: r.ContainerID},
			ip: r.IP, eniID: r.ENIID, at: now, ready: ready}
	}
	idle := 0
	for _, e := range p.enis {
		for _, ip := range e.ips {
			if ip.owner == recoveringOwner {
				ip.owner = ""
				ip.idleSince = now
				idle++
			}
		}
	}
	p.recovering = false
	p.publishLocked()
	p.mu.Unlock()
	for _, r := range recs {
		p.m.settled.WithLabelValues("recovered_allocation").Inc()
		p.log.Warn("the IPAM store was empty: recovered the allocation of a live pod",
			zap.String("pod", r.Key()), zap.Stringer("ip", r.IP), zap.String("eni", r.ENIID))
	}
	p.log.Info("the IPAM store was empty: the node's live pods are known; the other recovered addresses are idle",
		zap.Int("recoveredAllocations", len(recs)), zap.Int("idleIPs", idle))
	kick(p.kickFill)
}

// RecoveredContainerID is the container ID of an allocation recovered for a live pod whose
// sandbox ID the live-pod source does not know (the apiserver names pods, not sandboxes). A CNI
// container ID is hex, so no sandbox has this one: a DEL by sandbox does not match it, and the
// agent's GC releases it once no live host veth carries its address.
const RecoveredContainerID = "tern-recovered"

// RecoveredKey is the key of a recovered allocation of pod namespace/name.
func RecoveredKey(namespace, name string) PodKey {
	return PodKey{Namespace: namespace, Name: name, ContainerID: RecoveredContainerID}
}

// IsRecovered says whether k is a recovered allocation whose sandbox is unknown.
func (k PodKey) IsRecovered() bool { return k.ContainerID == RecoveredContainerID }
