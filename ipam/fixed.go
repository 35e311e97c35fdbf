package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/store"
)

// The pool's side of fixed pod addresses (ipam/fixedip decides, the pool executes): take one
// named address for a pod, keep an address for a pod that is gone (a hold), and let go of an
// address that another node took over.

var (
	// ErrAddressInUse: the cloud still has the named address elsewhere (an unassign on another
	// node is settling, or another ENI holds it). Retry with backoff.
	ErrAddressInUse = aliyun.ErrAddressInUse
	// ErrAddressHeld: another pod of this node holds the named address.
	ErrAddressHeld = errors.New("the address is held by another pod on this node")
	// ErrNoENIForAddress: no ENI of this node is on the address's vSwitch with room for one
	// more address.
	ErrNoENIForAddress = errors.New("no ENI of this node on the address's vSwitch has room")
	// ErrTryAgain: a fixed address cannot be given yet (another node still has it, or the
	// cloud reports it in use); the CNI answers "try again later".
	ErrTryAgain = errors.New("fixed address not available yet; try again")
	// ErrWrongZone: a pod's fixed address belongs to another zone than the node's.
	ErrWrongZone = errors.New("fixed address is in another zone")
)

// HoldContainerID is the container ID of a hold: the allocation that keeps a fixed address for
// a pod while it has no sandbox. A CNI container ID is hex, so no sandbox has this one.
const HoldContainerID = "tern-fixed-ip-hold"

// HoldKey is the hold allocation of pod namespace/name.
func HoldKey(namespace, name string) PodKey {
	return PodKey{Namespace: namespace, Name: name, ContainerID: HoldContainerID}
}

// IsHold says whether k is a hold rather than a sandbox.
func (k PodKey) IsHold() bool { return k.ContainerID == HoldContainerID }

// Zone is the node's zone (valid after Start).
func (p *Pool) Zone() string { return p.instance.ZoneID }

// AllocateAddress gives key the address ip, which lives in vSwitch vswitchID: an address the
// pool holds idle, or held for the same pod (another sandbox of it, or its hold), is taken
// over; any other address is assigned by name to an ENI of this node on that vSwitch. It
// fails with ErrAddressHeld (another pod here has it), ErrAddressInUse (the cloud has it
// elsewhere still; retry) or ErrNoENIForAddress.
func (p *Pool) AllocateAddress(ctx context.Context, key PodKey, ip netip.Addr, vswitchID string) (Allocation, error) {
	if key.Namespace == "" || key.Name == "" || key.ContainerID == "" {
		return Allocation{}, fmt.Errorf("allocate %s: pod key %q needs namespace, name and container id", ip, key.String())
	}
	if out, ok, err := p.takeHeldAddress(key, ip); ok || err != nil {
		return out, err
	}
	p.opMu.Lock()
	defer p.opMu.Unlock()
	// Looked again under opMu: a fill or a GC may have changed the pool meanwhile.
	if out, ok, err := p.takeHeldAddress(key, ip); ok || err != nil {
		return out, err
	}
	p.mu.Lock()
	var target *eniState
	for _, e := range p.sortedENIsLocked() {
		if e.info.VSwitchID != vswitchID || !e.info.CIDR.Contains(ip) || e.full || len(e.ips) >= p.perENI() {
			continue
		}
		if target == nil || len(e.ips) < len(target.ips) {
			target = e
		}
	}
	// Full ENIs on the vSwitch make room by giving an idle secondary address back.
	var spare *eniState
	var spareIP netip.Addr
	if target == nil {
		for _, e := range p.sortedENIsLocked() {
			if e.info.VSwitchID != vswitchID || !e.info.CIDR.Contains(ip) || e.full {
				continue
			}
			for _, a := range e.sortedIPs() {
				if st := e.ips[a]; st.owner == "" && !st.releasing && !st.primary {
					spare, spareIP = e, a
					st.releasing = true
					break
				}
			}
			if spare != nil {
				break
			}
		}
	}
	p.mu.Unlock()
	if target == nil && spare != nil {
		if _, err := p.unassign(ctx, spare, []netip.Addr{spareIP}); err != nil {
			p.mu.Lock()
			if st, ok := spare.ips[spareIP]; ok {
				st.releasing = false
			}
			p.mu.Unlock()
			return Allocation{}, fmt.Errorf("make room for %s on ENI %s: unassign idle %s: %w", ip, spare.info.ID, spareIP, err)
		}
		target = spare
	}
	if target == nil {
		return Allocation{}, fmt.Errorf("%w: %s is in vSwitch %s; this node's ENIs on it are full of pods or there are none (add the vSwitch to eni_conf vswitches of the node's zone, or free addresses)",
			ErrNoENIForAddress, ip, vswitchID)
	}
	return p.assignForPod(ctx, key, target.info.ID, []netip.Addr{ip})
}

// AllocateMovable gives key a secondary address, never an ENI's primary: a fixed address
// must be able to leave its ENI for another node's. An idle secondary is taken; without one,
// one address is assigned to an ENI with room, recorded as key's in the same transaction.
func (p *Pool) AllocateMovable(ctx context.Context, key PodKey) (Allocation, error) {
	if key.Namespace == "" || key.Name == "" || key.ContainerID == "" {
		return Allocation{}, fmt.Errorf("allocate: pod key %q needs namespace, name and container id", key.String())
	}
	pickIdle := func() (netip.Addr, error) {
		p.mu.Lock()
		defer p.mu.Unlock()
		if !p.started {
			return netip.Addr{}, ErrNotStarted
		}
		if a, ok := p.allocs[key.key()]; ok {
			return a.ip, nil
		}
		var best netip.Addr
		var bestSince time.Time
		for _, e := range p.sortedENIsLocked() {
			for _, a := range e.sortedIPs() {
				ip := e.ips[a]
				if ip.owner != "" || ip.releasing || ip.primary {
					continue
				}
				if !best.IsValid() || ip.idleSince.Before(bestSince) {
					best, bestSince = a, ip.idleSince
				}
			}
		}
		return best, nil
	}
	for attempt := 0; attempt < 3; attempt++ {
		ip, err := pickIdle()
		if err != nil {
			return Allocation{}, err
		}
		if !ip.IsValid() {
			break
		}
		out, ok, err := p.takeHeldAddress(key, ip)
		if ok {
			if p.idleLockedSafe() < p.cfgMinPool() {
				kick(p.kickFill)
			}
			return out, nil
		}
		if err != nil && !errors.Is(err, ErrAddressHeld) && !errors.Is(err, ErrAddressInUse) {
			return Allocation{}, err
		}
		// Taken meanwhile: pick again.
	}
	p.opMu.Lock()
	defer p.opMu.Unlock()
	p.mu.Lock()
	e, room := p.eniWithRoomLocked()
	p.mu.Unlock()
	if e == nil || room <= 0 {
		return Allocation{}, fmt.Errorf("%w: no idle secondary address and no ENI with room for one (a fixed address cannot be an ENI's primary)", ErrPoolEmptyTryAgain)
	}
	return p.assignForPod(ctx, key, e.info.ID, nil)
}

func (p *Pool) idleLockedSafe() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.idleLocked()
}

func (p *Pool) cfgMinPool() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cfg.MinPoolSize
}

// assignForPod assigns the named addresses (or, with none, one address of the cloud's
// choice) to eniID and records the first as key's, in the transaction that records the ENI's
// new address: it is never idle. opMu must be held.
func (p *Pool) assignForPod(ctx context.Context, key PodKey, eniID string, named []netip.Addr) (Allocation, error) {
	intent := store.Intent{Token: newToken(), Kind: store.IntentAssignIPs, ENIID: eniID, Count: 1, IPs: named, Created: p.now()}
	if err := p.st.PutIntent(intent); err != nil {
		return Allocation{}, fmt.Errorf("record intent to assign %v to %s: %w", named, eniID, err)
	}
	var got []netip.Addr
	var err error
	if len(named) > 0 {
		got, err = p.cloud.AssignSpecificIPs(ctx, eniID, named, intent.Token)
	} else {
		got, err = p.cloud.AssignPrivateIPs(ctx, eniID, 1, intent.Token)
	}
	if err == nil && len(got) != 1 {
		err = fmt.Errorf("the cloud assigned %v; want one address", got)
	}
	if err != nil {
		p.settleFailedIntent(ctx, intent, err)
		return Allocation{}, fmt.Errorf("assign an address to ENI %s for %s: %w", eniID, key, err)
	}
	ip := got[0]
	// Recorded as the pod's in the transaction that records the address: it is never idle.
	k := key.key()
	p.mu.Lock()
	e, ok := p.enis[eniID]
	if !ok {
		p.mu.Unlock()
		_ = p.st.DeleteIntent(intent.Token)
		return Allocation{}, fmt.Errorf("assign %s: ENI %s left the pool during the call", ip, eniID)
	}
	rec := e.info
	rec.IPs = unionIPs(rec.IPs, []netip.Addr{ip})
	a := &allocState{key: key, ip: ip, eniID: eniID, at: p.now(), ready: make(chan struct{})}
	close(a.ready)
	p.mu.Unlock()
	if err := p.st.Update(func(tx *store.Tx) error {
		if err := tx.PutENI(rec); err != nil {
			return err
		}
		if err := tx.PutAllocation(store.Allocation{Namespace: key.Namespace, Name: key.Name, ContainerID: key.ContainerID,
			IP: ip, ENIID: eniID, Allocated: a.at}); err != nil {
			return err
		}
		return tx.DeleteIntent(intent.Token)
	}); err != nil {
		// The address is on the ENI; the intent's replay records it (idle) later.
		return Allocation{}, fmt.Errorf("record %s assigned to %s for %s: %w", ip, eniID, key, err)
	}
	p.mu.Lock()
	e.info = rec
	e.ips[ip] = &ipState{owner: k}
	p.allocs[k] = a
	p.takeFromVSwitchLocked(rec.VSwitchID, 1)
	p.touchLocked(eniID)
	p.publishLocked()
	out := p.allocationLocked(a)
	p.mu.Unlock()
	p.log.Info("assigned a fixed address", zap.String("pod", k), zap.Stringer("ip", ip), zap.String("eni", eniID))
	return out, nil
}

// takeHeldAddress serves AllocateAddress from what the pool already holds. ok is false when
// the pool does not hold ip.
func (p *Pool) takeHeldAddress(key PodKey, ip netip.Addr) (Allocation, bool, error) {
	k := key.key()
	p.mu.Lock()
	if !p.started {
		p.mu.Unlock()
		return Allocation{}, false, ErrNotStarted
	}
	if a, ok := p.allocs[k]; ok {
		p.mu.Unlock()
		<-a.ready
		if a.err != nil || a.ip != ip {
			return Allocation{}, false, fmt.Errorf("allocate %s for %s: the sandbox already holds %s; DEL it first", ip, k, a.ip)
		}
		p.mu.Lock()
		out := p.allocationLocked(a)
		p.mu.Unlock()
		return out, true, nil
	}
	e, st := p.findAddressLocked(ip)
	if st == nil {
		p.mu.Unlock()
		return Allocation{}, false, nil
	}
	if st.releasing {
		p.mu.Unlock()
		return Allocation{}, false, fmt.Errorf("%w: %s is being unassigned from ENI %s on this node", ErrAddressInUse, ip, e.info.ID)
	}
	var prev *allocState
	if st.owner != "" {
		prev = p.allocs[st.owner]
		if prev == nil || prev.key.Namespace != key.Namespace || prev.key.Name != key.Name {
			p.mu.Unlock()
			return Allocation{}, false, fmt.Errorf("%w: %s is held by %s", ErrAddressHeld, ip, st.owner)
		}
		<-prev.ready
	}
	a := &allocState{key: key, ip: ip, eniID: e.info.ID, at: p.now(), ready: make(chan struct{})}
	close(a.ready)
	st.owner = k
	p.allocs[k] = a
	if prev != nil {
		delete(p.allocs, prev.key.key())
	}
	p.publishLocked()
	p.mu.Unlock()
	err := p.st.Update(func(tx *store.Tx) error {
		if prev != nil {
			if err := tx.DeleteAllocation(prev.key.key()); err != nil {
				return err
			}
		}
		return tx.PutAllocation(store.Allocation{Namespace: key.Namespace, Name: key.Name, ContainerID: key.ContainerID,
			IP: ip, ENIID: a.eniID, Allocated: a.at})
	})
	p.mu.Lock()
	defer p.mu.Unlock()
	if err != nil {
		delete(p.allocs, k)
		if prev != nil {
			p.allocs[prev.key.key()] = prev
			st.owner = prev.key.key()
		} else {
			st.owner = ""
			st.idleSince = p.now()
		}
		p.publishLocked()
		return Allocation{}, false, fmt.Errorf("allocate %s for %s: record allocation: %w", ip, k, err)
	}
	return p.allocationLocked(a), true, nil
}

// Hold moves key's allocation to the pod's hold key, so the address stays the pod's while it
// has no sandbox. A key without an allocation is not an error (nothing to hold).
func (p *Pool) Hold(key PodKey) (netip.Addr, bool, error) {
	hold := HoldKey(key.Namespace, key.Name)
	if key == hold {
		return netip.Addr{}, false, nil
	}
	p.mu.Lock()
	a, ok := p.allocs[key.key()]
	p.mu.Unlock()
	if !ok {
		return netip.Addr{}, false, nil
	}
	<-a.ready
	if a.err != nil {
		return netip.Addr{}, false, nil
	}
	out, err := p.AllocateAddress(context.Background(), hold, a.ip, "")
	if err != nil {
		return netip.Addr{}, false, fmt.Errorf("hold %s for %s/%s: %w", a.ip, key.Namespace, key.Name, err)
	}
	return out.IP, true, nil
}

// ForgetAddress removes ip from the pool without a cloud call: another node took it over (and
// unassigns it from this node's ENI itself). Only a hold may be forgotten; an address a
// sandbox uses is refused.
func (p *Pool) ForgetAddress(ip netip.Addr) error {
	p.opMu.Lock()
	defer p.opMu.Unlock()
	p.mu.Lock()
	e, st := p.findAddressLocked(ip)
	if st == nil {
		p.mu.Unlock()
		return nil
	}
	if st.primary {
		p.mu.Unlock()
		return fmt.Errorf("forget %s: it is the primary address of ENI %s, which cannot move", ip, e.info.ID)
	}
	var held *allocState
	if st.owner != "" {
		held = p.allocs[st.owner]
		if held == nil || !held.key.IsHold() {
			p.mu.Unlock()
			return fmt.Errorf("%w: forget %s: %s uses it", ErrAddressHeld, ip, st.owner)
		}
	}
	rec := e.info
	rec.IPs = slices.DeleteFunc(slices.Clone(rec.IPs), func(a netip.Addr) bool { return a == ip })
	p.mu.Unlock()
	if err := p.st.Update(func(tx *store.Tx) error {
		if held != nil {
			if err := tx.DeleteAllocation(held.key.key()); err != nil {
				return err
			}
		}
		return tx.PutENI(rec)
	}); err != nil {
		return fmt.Errorf("forget %s: %w", ip, err)
	}
	p.mu.Lock()
	e.info = rec
	delete(e.ips, ip)
	if held != nil {
		delete(p.allocs, held.key.key())
	}
	p.touchLocked(e.info.ID)
	p.publishLocked()
	p.mu.Unlock()
	p.log.Info("forgot a fixed address another node took over", zap.Stringer("ip", ip), zap.String("eni", e.info.ID))
	return nil
}

// findAddressLocked is the ENI holding ip on this node and its state (nil, nil: none).
// Call with p.mu held.
func (p *Pool) findAddressLocked(ip netip.Addr) (*eniState, *ipState) {
	for _, e := range p.enis {
		if st, ok := e.ips[ip]; ok {
			return e, st
		}
	}
	return nil, nil
}
