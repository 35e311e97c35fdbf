package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"time"

	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/store"
)

// The consistency model (docs/ipam.md, "State and crash safety"):
//
//   - A mutating call's reply is the truth about its outcome. DescribeNetworkInterfaces lags
//     behind Assign/Unassign/Create/Attach by an unknown but bounded time, so one listing is
//     never used to decide what the node owns.
//   - The store records every outcome the pool learned from a reply; an intent records a call
//     whose reply may have been lost. Every leftover intent is replayed with its ClientToken
//     (the cloud applies it once and answers with the same outcome), so after the replay the
//     store is complete.
//   - A listing that disagrees with the pool (an address or ENI the pool holds that is not
//     listed, or one listed that the pool does not hold) raises a suspicion. Only when a
//     listing taken at least ListingGrace later still disagrees does the pool act: it drops
//     what the cloud really lacks and adopts what the cloud really gives the node. Meanwhile it
//     keeps serving what it holds. A local change to an ENI clears the suspicions about it.
//   - An empty store (a node whose disk is new, e.g. its VM came back with a replaced system
//     disk under the same instance ID) holds nothing a lagging listing could contradict: an
//     ENI the listing shows attached to this instance and tagged for this node is adopted at
//     Start, with its addresses, instead of after ListingGrace. Waiting would leave the pool
//     empty meanwhile, so its refill would create ENIs for slots the node's own ENIs hold.
//     Its addresses are held until Options.LivePods says which of them live pods hold (a
//     store deleted under running pods): those become the pods' allocations, the rest idle
//     (recover.go).

// suspectKind says how the pool and a listing disagree.
type suspectKind int

const (
	missingIP  suspectKind = iota // the pool holds an address the listing lacks
	missingENI                    // the pool holds an ENI the listing lacks
	extraIP                       // the listing shows an address of a known ENI the pool lacks
	unknownENI                    // the listing shows an ENI of ours the pool does not know
)

type suspectKey struct {
	kind suspectKind
	eni  string
	ip   netip.Addr
}

// reconcile rebuilds the in-memory pool at Start: from the store, then by replaying the
// leftover intents, then by comparing with one listing (which only raises suspicions). It runs
// with opMu held.
func (p *Pool) reconcile(ctx context.Context) error {
	snap, err := p.st.Load()
	if err != nil {
		return err
	}
	fresh := len(snap.ENIs) == 0 && len(snap.Intents) == 0 && len(snap.Allocations) == 0
	now := p.now()
	// An ENI recorded but not yet recorded as attached is a creation whose intent is open: its
	// replay attaches it (or deletes it). Without such an intent (not expected) the record is
	// dropped, and the listing comparison adopts or deletes the ENI.
	var unattached []string
	for _, rec := range snap.ENIs {
		if rec.State != aliyun.StatusInUse && !slices.ContainsFunc(snap.Intents, func(in store.Intent) bool {
			return in.Kind == store.IntentCreateENI && in.ENIID == rec.ID
		}) {
			unattached = append(unattached, rec.ID)
		}
	}
	if len(unattached) > 0 {
		if err := p.st.Update(func(tx *store.Tx) error {
			for _, id := range unattached {
				if err := tx.DeleteENI(id); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			return fmt.Errorf("drop unattached ENI records %v: %w", unattached, err)
		}
	}
	p.mu.Lock()
	p.enis = map[string]*eniState{}
	for _, rec := range snap.ENIs {
		if rec.State != aliyun.StatusInUse {
			continue
		}
		p.enis[rec.ID] = newENIState(rec, now)
	}
	// What an open intent is about is not for allocation until the intent is resolved.
	for _, in := range snap.Intents {
		p.holdForIntentLocked(in)
	}
	p.allocs = map[string]*allocState{}
	p.suspects = map[suspectKey]time.Time{}
	p.mu.Unlock()

	replayErr := p.replayIntents(ctx, snap.Intents)

	// Allocations: the store's word, bound to the addresses of their ENIs.
	var dropped []store.Allocation
	p.mu.Lock()
	for _, a := range snap.Allocations {
		e, ok := p.enis[a.ENIID]
		if !ok {
			dropped = append(dropped, a)
			continue
		}
		ip, ok := e.ips[a.IP]
		if !ok {
			// The assign that brought it was recorded in the allocation but not in the ENI
			// (a failed store write): it is ours; the listing comparison confirms it.
			ip = &ipState{idleSince: now}
			e.ips[a.IP] = ip
			e.info.IPs = append(e.info.IPs, a.IP)
		}
		if ip.owner != "" || ip.releasing {
			dropped = append(dropped, a)
			continue
		}
		ip.owner = a.Key()
		ready := make(chan struct{})
		close(ready)
		p.allocs[a.Key()] = &allocState{key: PodKey{Namespace: a.Namespace, Name: a.Name, ContainerID: a.ContainerID},
			ip: a.IP, eniID: a.ENIID, at: a.Allocated, ready: ready}
	}
	p.mu.Unlock()
	if len(dropped) > 0 {
		if err := p.st.Update(func(tx *store.Tx) error {
			for _, a := range dropped {
				if err := tx.DeleteAllocation(a.Key()); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			return fmt.Errorf("drop allocations without an address: %w", err)
		}
		for _, a := range dropped {
			p.log.Error("dropped an allocation whose ENI the node no longer has (or whose address another allocation holds); recreate the pod",
				zap.String("pod", a.Key()), zap.Stringer("ip", a.IP), zap.String("eni", a.ENIID))
		}
	}

	// A recovery from an empty store that a crash or a failed Start interrupted is resumed:
	// the store it left has the adopted ENIs but not yet the live pods' allocations.
	resumed := snap.Meta[metaRecovering] != ""
	if fresh && p.opts.LivePods != nil {
		if err := p.st.Update(func(tx *store.Tx) error { return tx.SetMeta(metaRecovering, now.UTC().Format(time.RFC3339)) }); err != nil {
			return fmt.Errorf("record the recovery from an empty store: %w", err)
		}
	}
	res, err := p.compareWithListing(ctx, fresh || resumed)
	if err != nil {
		return err
	}
	if len(res.AdoptedENIs) > 0 {
		p.log.Warn("the IPAM store was empty: recovered the node's ENIs from the cloud (a new disk, or a store deleted)",
			zap.Strings("enis", res.AdoptedENIs))
	}
	switch {
	case p.opts.LivePods != nil && (resumed || (fresh && len(res.AdoptedENIs) > 0)):
		// The adopted addresses may be live pods' (a store deleted under running pods): none
		// is idle before the live-pod source has said which.
		p.mu.Lock()
		p.holdRecoveredLocked()
		p.mu.Unlock()
		p.recoverLivePods(ctx)
	case fresh && p.opts.LivePods != nil:
		// A new node: nothing to recover.
		if err := p.st.Update(func(tx *store.Tx) error { return tx.SetMeta(metaRecovering, "") }); err != nil {
			return fmt.Errorf("record the end of the recovery from an empty store: %w", err)
		}
	}
	p.mu.Lock()
	p.publishLocked()
	enis, allocs, suspects := len(p.enis), len(p.allocs), len(p.suspects)
	p.mu.Unlock()
	p.log.Info("reconciled with the cloud", zap.Int("enis", enis), zap.Int("allocations", allocs),
		zap.Int("replayedIntents", len(snap.Intents)), zap.Int("droppedAllocations", len(dropped)),
		zap.Int("suspects", suspects), zap.Strings("deletedENIs", res.DeletedENIs))
	if replayErr != nil {
		// The pool can serve what it has; the open intents are retried by the maintenance loop.
		p.log.Warn("some interrupted cloud operations could not be finished yet; retrying in the background", zap.Error(replayErr))
	}
	return nil
}

// holdForIntentLocked keeps what an open intent concerns away from allocation: the addresses
// of an unassign (they are gone, or going) and every address of an ENI being deleted.
func (p *Pool) holdForIntentLocked(in store.Intent) {
	e, ok := p.enis[in.ENIID]
	if !ok {
		return
	}
	switch in.Kind {
	case store.IntentUnassignIPs:
		for _, a := range in.IPs {
			if ip, ok := e.ips[a]; ok {
				ip.releasing = true
			}
		}
	case store.IntentDeleteENI:
		for _, ip := range e.ips {
			ip.releasing = true
		}
	}
}

// resolveIntents replays every intent left in the store. With opMu held no call is in flight,
// so any intent there is one whose reply was lost: to a crash, or to a failure that left the
// outcome unknown.
func (p *Pool) resolveIntents(ctx context.Context) error {
	snap, err := p.st.Load()
	if err != nil {
		return err
	}
	if len(snap.Intents) == 0 {
		return nil
	}
	return p.replayIntents(ctx, snap.Intents)
}

// replayIntents replays intents oldest first. One that cannot be finished now stays in the
// store for the next pass; the others are resolved whatever the rest do.
func (p *Pool) replayIntents(ctx context.Context, intents []store.Intent) error {
	intents = slices.Clone(intents)
	sort.SliceStable(intents, func(i, j int) bool { return intents[i].Created.Before(intents[j].Created) })
	var errs []error
	for _, in := range intents {
		if err := p.replayIntent(ctx, in); err != nil {
			errs = append(errs, fmt.Errorf("replay %s intent %s (ENI %q): %w", in.Kind, in.Token, in.ENIID, err))
		}
	}
	return errors.Join(errs...)
}

func (p *Pool) replayIntent(ctx context.Context, in store.Intent) error {
	switch in.Kind {
	case store.IntentAssignIPs:
		return p.replayAssign(ctx, in)
	case store.IntentCreateENI:
		return p.replayCreate(ctx, in)
	case store.IntentUnassignIPs:
		return p.replayUnassign(ctx, in)
	case store.IntentDeleteENI:
		return p.replayDelete(ctx, in)
	default:
		p.log.Warn("dropping an intent of unknown kind", zap.String("kind", in.Kind), zap.String("token", in.Token))
		return p.st.DeleteIntent(in.Token)
	}
}

// outcomeUnknown says whether a failed call may still have taken effect: it was cut short, or
// the cloud failed in a way that does not say. Any other error is the cloud refusing the call.
func outcomeUnknown(ctx context.Context, err error) bool {
	return ctx.Err() != nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, aliyun.ErrTransient) || errors.Is(err, aliyun.ErrTimeout)
}

// replayAssign asks for the same assignment again: the token makes the cloud answer with the
// addresses it assigned the first time (or assign them now, if the first call never arrived).
func (p *Pool) replayAssign(ctx context.Context, in store.Intent) error {
	var ips []netip.Addr
	var err error
	if len(in.IPs) > 0 {
		// An assign by name (a fixed pod address): the replay names the same addresses. It
		// comes back idle; the fixed-IP manager takes it again by name.
		ips, err = p.cloud.AssignSpecificIPs(ctx, in.ENIID, in.IPs, in.Token)
	} else {
		ips, err = p.cloud.AssignPrivateIPs(ctx, in.ENIID, in.Count, in.Token)
	}
	if err != nil {
		if outcomeUnknown(ctx, err) {
			return err
		}
		p.log.Info("an interrupted assign was refused on replay: it never took effect", zap.String("eni", in.ENIID), zap.Error(err))
		return p.st.DeleteIntent(in.Token)
	}
	p.addIPs(in.ENIID, ips, in.Token)
	p.log.Info("finished an interrupted assign", zap.String("eni", in.ENIID), zap.Stringers("ips", ips))
	return nil
}

// addIPs records addresses the cloud assigned to a pool ENI and drops the intent, in one
// transaction, then makes them idle.
func (p *Pool) addIPs(eniID string, ips []netip.Addr, token string) {
	p.mu.Lock()
	e, ok := p.enis[eniID]
	if !ok {
		p.mu.Unlock()
		// Not ours any more: the listing comparison adopts or ignores what is there.
		if err := p.st.DeleteIntent(token); err != nil {
			p.log.Warn("cannot drop intent", zap.String("token", token), zap.Error(err))
		}
		return
	}
	rec := e.info
	rec.IPs = unionIPs(rec.IPs, ips)
	p.mu.Unlock()
	if err := p.st.Update(func(tx *store.Tx) error {
		if err := tx.PutENI(rec); err != nil {
			return err
		}
		return tx.DeleteIntent(token)
	}); err != nil {
		// The addresses are real; the intent stays and is replayed (same answer) later.
		p.log.Error("cannot record assigned IPs; they are used anyway and recorded on the next replay",
			zap.String("eni", eniID), zap.Error(err))
	}
	p.mu.Lock()
	e.info = rec
	now := p.now()
	for _, ip := range ips {
		if _, ok := e.ips[ip]; !ok {
			e.ips[ip] = &ipState{idleSince: now}
		}
	}
	p.touchLocked(eniID)
	p.publishLocked()
	p.mu.Unlock()
}

// replayCreate asks for the same ENI again (the token returns the ENI the first call made,
// with exactly its addresses), then attaches it as the interrupted growth would have, or
// deletes it when it cannot be attached.
func (p *Pool) replayCreate(ctx context.Context, in store.Intent) error {
	p.mu.Lock()
	cfg := p.cfg
	p.mu.Unlock()
	eni, err := p.cloud.CreateENI(ctx, p.createRequest(cfg, in.VSwitchID, in.Count, in.Token))
	if err != nil {
		if outcomeUnknown(ctx, err) {
			return err
		}
		p.log.Info("an interrupted ENI creation was refused on replay: its ENI does not exist", zap.String("vSwitch", in.VSwitchID), zap.Error(err))
		return p.st.Update(func(tx *store.Tx) error {
			if in.ENIID != "" {
				p.mu.Lock()
				_, known := p.enis[in.ENIID]
				p.mu.Unlock()
				if !known {
					if err := tx.DeleteENI(in.ENIID); err != nil {
						return err
					}
				}
			}
			return tx.DeleteIntent(in.Token)
		})
	}
	p.mu.Lock()
	_, known := p.enis[eni.ID]
	p.mu.Unlock()
	if known {
		// Recorded as attached already (only the intent's deletion was lost).
		return p.st.DeleteIntent(in.Token)
	}
	cidr, err := p.vswitchCIDR(ctx, in.VSwitchID)
	if err != nil {
		return fmt.Errorf("CIDR of vSwitch %s: %w", in.VSwitchID, err)
	}
	rec := store.ENI{ID: eni.ID, MAC: eni.MAC, VSwitchID: in.VSwitchID, CIDR: cidr, PrimaryIP: eni.PrimaryIP, IPs: eni.Secondary, State: aliyun.StatusAvailable}
	in.ENIID = eni.ID
	if err := p.st.Update(func(tx *store.Tx) error {
		if err := tx.PutENI(rec); err != nil {
			return err
		}
		return tx.PutIntent(in)
	}); err != nil {
		return fmt.Errorf("record created ENI %s: %w", eni.ID, err)
	}
	if !cfg.HotPlug {
		p.log.Info("deleting an ENI whose creation was interrupted: hot_plug is off now", zap.String("eni", eni.ID))
		return p.abandonCreated(ctx, in, eni.ID)
	}
	// AttachENI also finishes an attach already under way (the ENI may still be Attaching).
	attached, err := p.cloud.AttachENI(ctx, eni.ID, p.opts.InstanceID)
	if err != nil {
		if outcomeUnknown(ctx, err) {
			return err
		}
		p.log.Warn("cannot attach an ENI whose creation was interrupted; deleting it", zap.String("eni", eni.ID), zap.Error(err))
		return p.abandonCreated(ctx, in, eni.ID)
	}
	if attached.MAC != "" {
		rec.MAC = attached.MAC
	}
	p.addENI(rec, in.Token)
	p.log.Info("finished an interrupted ENI creation", zap.String("eni", rec.ID), zap.Int("ips", len(rec.IPs)))
	return nil
}

// abandonCreated deletes an ENI the pool created but will not use, then forgets it.
func (p *Pool) abandonCreated(ctx context.Context, in store.Intent, id string) error {
	if err := p.destroyENI(ctx, id); err != nil {
		return fmt.Errorf("delete unattached ENI %s: %w", id, err)
	}
	return p.st.Update(func(tx *store.Tx) error {
		if err := tx.DeleteENI(id); err != nil {
			return err
		}
		return tx.DeleteIntent(in.Token)
	})
}

// addENI records an attached ENI and drops the create intent in one transaction, then puts its
// addresses in the pool.
func (p *Pool) addENI(rec store.ENI, token string) {
	rec.State = aliyun.StatusInUse
	if err := p.st.Update(func(tx *store.Tx) error {
		if err := tx.PutENI(rec); err != nil {
			return err
		}
		return tx.DeleteIntent(token)
	}); err != nil {
		p.log.Error("cannot record attached ENI; recorded on the next replay", zap.String("eni", rec.ID), zap.Error(err))
	}
	p.mu.Lock()
	p.enis[rec.ID] = newENIState(rec, p.now())
	p.touchLocked(rec.ID)
	p.takeFromVSwitchLocked(rec.VSwitchID, 1+len(rec.IPs))
	p.publishLocked()
	p.mu.Unlock()
}

// replayUnassign removes the addresses again ("not assigned" counts as done) and forgets them.
func (p *Pool) replayUnassign(ctx context.Context, in store.Intent) error {
	if err := p.cloud.UnassignPrivateIPs(ctx, in.ENIID, in.IPs); err != nil {
		return err // the addresses stay held back; the next pass tries again
	}
	p.removeIPs(in.ENIID, in.IPs, in.Token)
	p.log.Info("finished an interrupted unassign", zap.String("eni", in.ENIID), zap.Stringers("ips", in.IPs))
	return nil
}

// removeIPs records that addresses left a pool ENI and drops the intent, in one transaction.
func (p *Pool) removeIPs(eniID string, ips []netip.Addr, token string) {
	p.mu.Lock()
	e, ok := p.enis[eniID]
	var rec store.ENI
	if ok {
		rec = e.info
		rec.IPs = slices.DeleteFunc(slices.Clone(rec.IPs), func(a netip.Addr) bool { return slices.Contains(ips, a) })
	}
	p.mu.Unlock()
	if err := p.st.Update(func(tx *store.Tx) error {
		if ok {
			if err := tx.PutENI(rec); err != nil {
				return err
			}
		}
		return tx.DeleteIntent(token)
	}); err != nil {
		p.log.Error("cannot record unassigned IPs; recorded on the next replay", zap.String("eni", eniID), zap.Error(err))
	}
	if !ok {
		return
	}
	p.mu.Lock()
	e.info = rec
	for _, a := range ips {
		delete(e.ips, a)
	}
	p.touchLocked(eniID)
	p.publishLocked()
	p.mu.Unlock()
}

// replayDelete detaches and deletes the ENI again; both are idempotent.
func (p *Pool) replayDelete(ctx context.Context, in store.Intent) error {
	if err := p.destroyENI(ctx, in.ENIID); err != nil {
		return err
	}
	p.forgetENI(in.ENIID, in.Token)
	p.log.Info("finished an interrupted ENI deletion", zap.String("eni", in.ENIID))
	return nil
}

// forgetENI removes a deleted ENI from the store (with its intent) and from the pool.
func (p *Pool) forgetENI(id, token string) {
	if err := p.st.Update(func(tx *store.Tx) error {
		if err := tx.DeleteENI(id); err != nil {
			return err
		}
		if token == "" {
			return nil
		}
		return tx.DeleteIntent(token)
	}); err != nil {
		p.log.Error("cannot record deleted ENI; recorded on the next replay", zap.String("eni", id), zap.Error(err))
	}
	p.mu.Lock()
	delete(p.enis, id)
	p.touchLocked(id)
	p.publishLocked()
	p.mu.Unlock()
}

// touchLocked clears the suspicions about an ENI the pool just changed: a listing taken before
// the change says nothing about the ENI after it.
func (p *Pool) touchLocked(eniID string) {
	for k := range p.suspects {
		if k.eni == eniID {
			delete(p.suspects, k)
		}
	}
}

// GCResult says what GC cleaned up.
type GCResult struct {
	ReleasedAllocations []PodKey
	DeletedENIs         []string
	AdoptedENIs         []string
	// AdoptedIPs are addresses the cloud kept giving a known ENI that the pool did not hold.
	AdoptedIPs []netip.Addr
	// DroppedIPs are addresses the pool held that the cloud kept not listing.
	DroppedIPs []netip.Addr
}

// GC releases allocations whose pods are gone, finishes interrupted cloud operations, and
// compares the pool with the cloud (see compareWithListing): ENIs and addresses on which the
// two disagree for longer than ListingGrace are adopted, deleted or dropped. livePods returns
// the set of live pods as "namespace/name"; it must not return nil (an unknown set would
// release everything).
func (p *Pool) GC(ctx context.Context, livePods func() map[string]bool) (GCResult, error) {
	var res GCResult
	live := livePods()
	if live == nil {
		return res, errors.New("ipam GC: live pod set is nil; refusing to release every allocation")
	}
	p.mu.Lock()
	var dead []PodKey
	for _, a := range p.allocs {
		if !live[a.key.Namespace+"/"+a.key.Name] {
			dead = append(dead, a.key)
		}
	}
	p.mu.Unlock()
	for _, k := range dead {
		if err := p.Release(ctx, k); err != nil {
			return res, fmt.Errorf("ipam GC: %w", err)
		}
		res.ReleasedAllocations = append(res.ReleasedAllocations, k)
	}

	p.opMu.Lock()
	defer p.opMu.Unlock()
	p.recoverLivePods(ctx)
	if err := p.resolveIntents(ctx); err != nil {
		p.log.Warn("ipam GC: interrupted cloud operations still open", zap.Error(err))
	}
	cmp, err := p.compareWithListing(ctx, false)
	if err != nil {
		return res, fmt.Errorf("ipam GC: %w", err)
	}
	res.DeletedENIs, res.AdoptedENIs, res.AdoptedIPs, res.DroppedIPs = cmp.DeletedENIs, cmp.AdoptedENIs, cmp.AdoptedIPs, cmp.DroppedIPs
	p.reclaim(ctx)
	if len(res.ReleasedAllocations)+len(res.DeletedENIs)+len(res.AdoptedENIs)+len(res.AdoptedIPs)+len(res.DroppedIPs) > 0 {
		p.log.Info("ipam GC", zap.Int("released", len(res.ReleasedAllocations)),
			zap.Strings("deletedENIs", res.DeletedENIs), zap.Strings("adoptedENIs", res.AdoptedENIs),
			zap.Stringers("adoptedIPs", res.AdoptedIPs), zap.Stringers("droppedIPs", res.DroppedIPs))
	}
	return res, nil
}

// verify is the maintenance loop's pass after ListingGrace: finish open intents, then compare
// with a fresh listing. It runs with opMu held.
func (p *Pool) verify(ctx context.Context) {
	p.recoverLivePods(ctx)
	if err := p.resolveIntents(ctx); err != nil && ctx.Err() == nil {
		p.log.Warn("interrupted cloud operations still open; retrying later", zap.Error(err))
		p.scheduleVerify()
	}
	if _, err := p.compareWithListing(ctx, false); err != nil && ctx.Err() == nil {
		p.log.Warn("cannot compare the pool with the cloud; retrying later", zap.Error(err))
		p.scheduleVerify()
	}
}

// compareWithListing lists the node's ENIs and compares them with the pool. A disagreement
// seen for the first time is only remembered; one that a listing at least ListingGrace later
// still shows is acted upon. ENIs with an open intent are left out (the replay settles them).
// With adoptNow (Start on an empty store) an ENI of ours attached to this instance is adopted
// at once. It runs with opMu held.
func (p *Pool) compareWithListing(ctx context.Context, adoptNow bool) (GCResult, error) {
	var res GCResult
	listedAt := p.now()
	ours, err := p.cloud.ListENIs(ctx, aliyun.ENIFilter{Tags: p.ownTags()})
	if err != nil {
		return res, fmt.Errorf("list our ENIs: %w", err)
	}
	onInstance, err := p.cloud.ListENIs(ctx, aliyun.ENIFilter{InstanceID: p.opts.InstanceID})
	if err != nil {
		return res, fmt.Errorf("list ENIs of %s: %w", p.opts.InstanceID, err)
	}
	snap, err := p.st.Load()
	if err != nil {
		return res, err
	}
	busy := map[string]bool{}
	for _, in := range snap.Intents {
		busy[in.ENIID] = true
	}

	listed := map[string]aliyun.ENI{}
	otherKind := map[string]bool{}
	for _, e := range ours {
		if e.Tags[TagKind] != "" {
			otherKind[e.ID] = true // another kind's ENI (exclusive): not the pool's
			continue
		}
		listed[e.ID] = e
	}
	p.mu.Lock()
	found := map[suspectKey]bool{}
	for id, st := range p.enis {
		if busy[id] {
			continue
		}
		le, ok := listed[id]
		if !ok {
			found[suspectKey{kind: missingENI, eni: id}] = true
			continue
		}
		have := map[netip.Addr]bool{}
		for _, a := range le.Secondary {
			have[a] = true
			if _, ok := st.ips[a]; !ok {
				found[suspectKey{kind: extraIP, eni: id, ip: a}] = true
			}
		}
		for a, ip := range st.ips {
			// The primary is never in the secondary list; the ENI's listing vouches for it.
			if !have[a] && !ip.releasing && !ip.primary {
				found[suspectKey{kind: missingIP, eni: id, ip: a}] = true
			}
		}
	}
	for id := range listed {
		if _, known := p.enis[id]; !known && !busy[id] {
			found[suspectKey{kind: unknownENI, eni: id}] = true
		}
	}
	var due []suspectKey
	for k := range p.suspects {
		if !found[k] {
			delete(p.suspects, k) // the listing caught up
		}
	}
	for k := range found {
		first, seen := p.suspects[k]
		switch {
		case !seen && adoptNow && k.kind == unknownENI &&
			listed[k.eni].Status == aliyun.StatusInUse && listed[k.eni].InstanceID == p.opts.InstanceID:
			due = append(due, k)
		case !seen:
			p.suspects[k] = listedAt
		case listedAt.Sub(first) >= p.opts.ListingGrace:
			due = append(due, k)
			delete(p.suspects, k)
		}
	}
	p.foreign = 0
	for _, e := range onInstance {
		_, known := p.enis[e.ID]
		// A member ENI takes no device slot (it rides on the trunk ENI, which does); another
		// kind's ENI is that kind's to count.
		if !known && e.Type != aliyun.TypeMember && !otherKind[e.ID] && !found[suspectKey{kind: unknownENI, eni: e.ID}] && (e.Status == aliyun.StatusInUse || e.Status == aliyun.StatusAttaching) {
			p.foreign++
		}
	}
	pending := len(p.suspects) > 0
	p.mu.Unlock()

	sort.Slice(due, func(i, j int) bool {
		if due[i].eni != due[j].eni {
			return due[i].eni < due[j].eni
		}
		return due[i].ip.Less(due[j].ip)
	})
	var errs []error
	for _, k := range due {
		if err := p.settle(ctx, k, listed[k.eni], &res); err != nil {
			errs = append(errs, err)
		}
	}
	if pending {
		p.scheduleVerify()
	}
	return res, errors.Join(errs...)
}

// settle acts on a disagreement that outlived ListingGrace.
func (p *Pool) settle(ctx context.Context, k suspectKey, le aliyun.ENI, res *GCResult) error {
	switch k.kind {
	case missingIP:
		p.dropIPs(k.eni, []netip.Addr{k.ip})
		res.DroppedIPs = append(res.DroppedIPs, k.ip)
		p.m.settled.WithLabelValues("dropped_ip").Inc()
	case missingENI:
		p.mu.Lock()
		var ips []netip.Addr
		if e, ok := p.enis[k.eni]; ok {
			ips = e.sortedIPs()
		}
		p.mu.Unlock()
		p.dropIPs(k.eni, ips)
		p.log.Error("an ENI of the pool is not listed any more; forgetting it", zap.String("eni", k.eni))
		p.forgetENI(k.eni, "")
		p.m.settled.WithLabelValues("forgot_eni").Inc()
	case extraIP:
		p.adoptIPs(k.eni, []netip.Addr{k.ip})
		res.AdoptedIPs = append(res.AdoptedIPs, k.ip)
		p.m.settled.WithLabelValues("adopted_ip").Inc()
	case unknownENI:
		switch {
		case le.Status == aliyun.StatusInUse && le.InstanceID == p.opts.InstanceID:
			cidr, err := p.vswitchCIDR(ctx, le.VSwitchID)
			if err != nil {
				return fmt.Errorf("adopt ENI %s: %w", le.ID, err)
			}
			rec := store.ENI{ID: le.ID, MAC: le.MAC, VSwitchID: le.VSwitchID, CIDR: cidr, PrimaryIP: le.PrimaryIP,
				IPs: slices.Clone(le.Secondary), State: aliyun.StatusInUse}
			if err := p.st.Update(func(tx *store.Tx) error { return tx.PutENI(rec) }); err != nil {
				return fmt.Errorf("record adopted ENI %s: %w", le.ID, err)
			}
			p.mu.Lock()
			p.enis[le.ID] = newENIState(rec, p.now())
			p.publishLocked()
			p.mu.Unlock()
			res.AdoptedENIs = append(res.AdoptedENIs, le.ID)
			p.m.settled.WithLabelValues("adopted_eni").Inc()
			p.log.Warn("adopted an ENI of this node the pool did not know", zap.String("eni", le.ID), zap.Int("ips", len(rec.IPs)))
		case le.Status == aliyun.StatusAvailable ||
			(le.InstanceID == p.opts.InstanceID && le.Status == aliyun.StatusDetaching):
			if err := p.destroyENI(ctx, le.ID); err != nil {
				return fmt.Errorf("delete leftover ENI %s: %w", le.ID, err)
			}
			res.DeletedENIs = append(res.DeletedENIs, le.ID)
			p.m.settled.WithLabelValues("deleted_eni").Inc()
			p.log.Warn("deleted an ENI tagged for this node that the pool did not know", zap.String("eni", le.ID))
		default:
			p.log.Warn("ENI tagged for this node is attached elsewhere; leaving it alone",
				zap.String("eni", le.ID), zap.String("status", le.Status), zap.String("instance", le.InstanceID))
		}
	}
	return nil
}

// dropIPs forgets addresses the cloud does not give the ENI, with any allocation on them.
func (p *Pool) dropIPs(eniID string, ips []netip.Addr) {
	p.mu.Lock()
	e, ok := p.enis[eniID]
	if !ok {
		p.mu.Unlock()
		return
	}
	var lost []*allocState
	for _, a := range ips {
		if ip, ok := e.ips[a]; ok && ip.owner != "" {
			if al, ok := p.allocs[ip.owner]; ok {
				lost = append(lost, al)
			}
		}
	}
	rec := e.info
	rec.IPs = slices.DeleteFunc(slices.Clone(rec.IPs), func(a netip.Addr) bool { return slices.Contains(ips, a) })
	p.mu.Unlock()
	if err := p.st.Update(func(tx *store.Tx) error {
		for _, al := range lost {
			if err := tx.DeleteAllocation(al.key.key()); err != nil {
				return err
			}
		}
		return tx.PutENI(rec)
	}); err != nil {
		p.log.Error("cannot record dropped IPs", zap.String("eni", eniID), zap.Error(err))
		return
	}
	p.mu.Lock()
	e.info = rec
	for _, a := range ips {
		delete(e.ips, a)
	}
	for _, al := range lost {
		delete(p.allocs, al.key.key())
	}
	p.publishLocked()
	p.mu.Unlock()
	for _, al := range lost {
		p.log.Error("dropped an allocation whose address the cloud has not listed for longer than the listing grace; recreate the pod",
			zap.String("pod", al.key.key()), zap.Stringer("ip", al.ip), zap.String("eni", eniID))
	}
	if len(ips) > 0 {
		p.log.Warn("dropped addresses the cloud does not list on the ENI", zap.String("eni", eniID), zap.Stringers("ips", ips))
	}
}

// adoptIPs takes addresses the cloud keeps giving a pool ENI as idle.
func (p *Pool) adoptIPs(eniID string, ips []netip.Addr) {
	p.mu.Lock()
	e, ok := p.enis[eniID]
	if !ok {
		p.mu.Unlock()
		return
	}
	rec := e.info
	rec.IPs = unionIPs(rec.IPs, ips)
	p.mu.Unlock()
	if err := p.st.Update(func(tx *store.Tx) error { return tx.PutENI(rec) }); err != nil {
		p.log.Error("cannot record adopted IPs", zap.String("eni", eniID), zap.Error(err))
		return
	}
	p.mu.Lock()
	e.info = rec
	for _, a := range ips {
		if _, ok := e.ips[a]; !ok {
			e.ips[a] = &ipState{idleSince: p.now()}
		}
	}
	p.publishLocked()
	p.mu.Unlock()
	p.log.Warn("adopted addresses the cloud lists on the ENI but the pool did not hold", zap.String("eni", eniID), zap.Stringers("ips", ips))
}

// scheduleVerify makes the maintenance loop compare with the cloud again after ListingGrace
// (plus jitter).
func (p *Pool) scheduleVerify() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.verifyTimer != nil {
		return
	}
	// Up to LoopJitter later than ListingGrace (never earlier: a listing is trusted only
	// after the grace), so nodes that failed together do not list ENIs again together.
	p.verifyTimer = time.AfterFunc(JitterUp(p.opts.ListingGrace, LoopJitter, p.rnd), func() {
		p.mu.Lock()
		p.verifyTimer = nil
		p.mu.Unlock()
		kick(p.kickVerify)
	})
}

// unionIPs returns have plus the addresses of add it lacks, in a new slice (have may be a
// record the pool still shares).
func unionIPs(have, add []netip.Addr) []netip.Addr {
	out := slices.Clone(have)
	for _, a := range add {
		if !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	return out
}
