package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/store"
)

// reconcile rebuilds the in-memory pool from the store and the cloud, the cloud being the truth
// for which ENIs and addresses exist and the store for which pod holds which address. It runs
// at Start with opMu held.
//
//   - Our ENIs (found by tags) attached to this instance are adopted with the addresses the
//     cloud lists, whatever the store says: this picks up addresses assigned by a call whose
//     reply was lost to a crash (an assign intent).
//   - Our ENIs that are Available were being created (create intent) or deleted (delete
//     intent) when the agent stopped: a creation is finished by attaching the ENI when the
//     instance has room, everything else is deleted.
//   - Store ENIs the cloud no longer has, and allocations whose address is not on an adopted
//     ENI, are dropped (logged: such a pod must be recreated).
//   - Every intent is cleared: its outcome is now visible in the cloud.
func (p *Pool) reconcile(ctx context.Context) error {
	snap, err := p.st.Load()
	if err != nil {
		return err
	}
	ours, err := p.cloud.ListENIs(ctx, aliyun.ENIFilter{Tags: p.ownTags()})
	if err != nil {
		return fmt.Errorf("list our ENIs: %w", err)
	}
	onInstance, err := p.cloud.ListENIs(ctx, aliyun.ENIFilter{InstanceID: p.opts.InstanceID})
	if err != nil {
		return fmt.Errorf("list ENIs of %s: %w", p.opts.InstanceID, err)
	}
	p.mu.Lock()
	cfg := p.cfg
	p.mu.Unlock()

	stored := map[string]store.ENI{}
	for _, e := range snap.ENIs {
		stored[e.ID] = e
	}
	deleting := map[string]bool{}
	for _, in := range snap.Intents {
		if in.Kind == store.IntentDeleteENI {
			deleting[in.ENIID] = true
		}
	}
	attachedCount := 0
	for _, e := range onInstance {
		if e.Status == aliyun.StatusInUse || e.Status == aliyun.StatusAttaching {
			attachedCount++
		}
	}

	adopted := map[string]store.ENI{}
	adopt := func(e aliyun.ENI) error {
		rec := stored[e.ID]
		rec.ID, rec.MAC, rec.VSwitchID, rec.PrimaryIP = e.ID, e.MAC, e.VSwitchID, e.PrimaryIP
		rec.IPs = append([]netip.Addr(nil), e.Secondary...)
		rec.State = aliyun.StatusInUse
		if !rec.CIDR.IsValid() {
			cidr, err := p.vswitchCIDR(ctx, e.VSwitchID)
			if err != nil {
				return fmt.Errorf("CIDR of vSwitch %s of ENI %s: %w", e.VSwitchID, e.ID, err)
			}
			rec.CIDR = cidr
		}
		adopted[e.ID] = rec
		return nil
	}
	var destroyed []string
	for _, e := range ours {
		switch {
		case e.InstanceID == p.opts.InstanceID && (e.Status == aliyun.StatusInUse || e.Status == aliyun.StatusAttaching):
			if e.Status == aliyun.StatusAttaching {
				got, err := p.cloud.AttachENI(ctx, e.ID, p.opts.InstanceID) // waits for InUse
				if err != nil {
					return fmt.Errorf("finish attaching ENI %s: %w", e.ID, err)
				}
				e = got
			}
			if err := adopt(e); err != nil {
				return err
			}
		case e.Status == aliyun.StatusAvailable && !deleting[e.ID] && cfg.HotPlug && attachedCount < p.limits.ENIs:
			got, err := p.cloud.AttachENI(ctx, e.ID, p.opts.InstanceID)
			if err != nil {
				p.log.Warn("cannot finish an interrupted ENI creation; deleting it", zap.String("eni", e.ID), zap.Error(err))
				if derr := p.destroyENI(ctx, e.ID); derr != nil {
					return fmt.Errorf("delete unattachable ENI %s: %w", e.ID, derr)
				}
				destroyed = append(destroyed, e.ID)
				continue
			}
			attachedCount++
			if err := adopt(got); err != nil {
				return err
			}
			p.log.Info("finished an interrupted ENI creation", zap.String("eni", e.ID))
		case e.Status == aliyun.StatusAvailable ||
			(e.InstanceID == p.opts.InstanceID && e.Status == aliyun.StatusDetaching):
			if err := p.destroyENI(ctx, e.ID); err != nil {
				return fmt.Errorf("delete leftover ENI %s: %w", e.ID, err)
			}
			destroyed = append(destroyed, e.ID)
		default:
			p.log.Warn("ENI tagged for this node is attached elsewhere; leaving it alone",
				zap.String("eni", e.ID), zap.String("status", e.Status), zap.String("instance", e.InstanceID))
		}
	}

	// Allocations survive if their address is on an adopted ENI, once each.
	type owned struct {
		eni string
		ip  netip.Addr
	}
	taken := map[owned]string{}
	var keep, drop []store.Allocation
	for _, a := range snap.Allocations {
		rec, ok := adopted[a.ENIID]
		has := false
		if ok {
			for _, ip := range rec.IPs {
				has = has || ip == a.IP
			}
		}
		o := owned{a.ENIID, a.IP}
		if !has || taken[o] != "" {
			drop = append(drop, a)
			continue
		}
		taken[o] = a.Key()
		keep = append(keep, a)
	}

	err = p.st.Update(func(tx *store.Tx) error {
		for _, rec := range adopted {
			if err := tx.PutENI(rec); err != nil {
				return err
			}
		}
		for id := range stored {
			if _, ok := adopted[id]; !ok {
				if err := tx.DeleteENI(id); err != nil {
					return err
				}
			}
		}
		for _, a := range drop {
			if err := tx.DeleteAllocation(a.Key()); err != nil {
				return err
			}
		}
		for _, in := range snap.Intents {
			if err := tx.DeleteIntent(in.Token); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("record reconciled state: %w", err)
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	p.enis = map[string]*eniState{}
	now := p.now()
	for id, rec := range adopted {
		st := &eniState{info: rec, ips: map[netip.Addr]*ipState{}}
		for _, ip := range rec.IPs {
			st.ips[ip] = &ipState{idleSince: now}
		}
		p.enis[id] = st
	}
	p.allocs = map[string]*allocState{}
	for _, a := range keep {
		key := PodKey{Namespace: a.Namespace, Name: a.Name, ContainerID: a.ContainerID}
		ready := make(chan struct{})
		close(ready)
		p.allocs[a.Key()] = &allocState{key: key, ip: a.IP, eniID: a.ENIID, at: a.Allocated, ready: ready}
		p.enis[a.ENIID].ips[a.IP].owner = a.Key()
	}
	p.foreign = 0
	for _, e := range onInstance {
		if _, ok := adopted[e.ID]; !ok && (e.Status == aliyun.StatusInUse || e.Status == aliyun.StatusAttaching) {
			p.foreign++
		}
	}
	p.publishLocked()
	for _, a := range drop {
		p.log.Warn("dropped an allocation whose address the cloud no longer gives this node; recreate the pod",
			zap.String("pod", a.Key()), zap.Stringer("ip", a.IP), zap.String("eni", a.ENIID))
	}
	p.log.Info("reconciled with the cloud", zap.Int("enis", len(adopted)), zap.Int("allocations", len(keep)),
		zap.Int("droppedAllocations", len(drop)), zap.Int("clearedIntents", len(snap.Intents)),
		zap.Strings("deletedENIs", destroyed))
	return nil
}

// GCResult says what GC cleaned up.
type GCResult struct {
	ReleasedAllocations []PodKey
	DeletedENIs         []string
	AdoptedENIs         []string
}

// GC releases allocations whose pods are gone and cleans the cloud side: ENIs tagged for this
// node that the pool does not know are deleted when detached (Available) and adopted when
// attached to this instance. livePods returns the set of live pods as "namespace/name"; it must
// not return nil (an unknown set would release everything).
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
	ours, err := p.cloud.ListENIs(ctx, aliyun.ENIFilter{Tags: p.ownTags()})
	if err != nil {
		return res, fmt.Errorf("ipam GC: list our ENIs: %w", err)
	}
	for _, e := range ours {
		p.mu.Lock()
		_, known := p.enis[e.ID]
		p.mu.Unlock()
		if known {
			continue
		}
		switch {
		case e.Status == aliyun.StatusAvailable:
			if err := p.destroyENI(ctx, e.ID); err != nil {
				return res, fmt.Errorf("ipam GC: delete leftover ENI %s: %w", e.ID, err)
			}
			res.DeletedENIs = append(res.DeletedENIs, e.ID)
		case e.Status == aliyun.StatusInUse && e.InstanceID == p.opts.InstanceID:
			cidr, err := p.vswitchCIDR(ctx, e.VSwitchID)
			if err != nil {
				return res, fmt.Errorf("ipam GC: adopt ENI %s: %w", e.ID, err)
			}
			rec := store.ENI{ID: e.ID, MAC: e.MAC, VSwitchID: e.VSwitchID, CIDR: cidr, PrimaryIP: e.PrimaryIP, IPs: e.Secondary, State: aliyun.StatusInUse}
			if err := p.st.Update(func(tx *store.Tx) error { return tx.PutENI(rec) }); err != nil {
				return res, fmt.Errorf("ipam GC: record adopted ENI %s: %w", e.ID, err)
			}
			p.mu.Lock()
			st := &eniState{info: rec, ips: map[netip.Addr]*ipState{}}
			for _, ip := range rec.IPs {
				st.ips[ip] = &ipState{idleSince: p.now()}
			}
			p.enis[e.ID] = st
			p.foreign = max(p.foreign-1, 0)
			p.publishLocked()
			p.mu.Unlock()
			res.AdoptedENIs = append(res.AdoptedENIs, e.ID)
		}
	}
	p.reclaim(ctx)
	if len(res.ReleasedAllocations)+len(res.DeletedENIs)+len(res.AdoptedENIs) > 0 {
		p.log.Info("ipam GC", zap.Int("released", len(res.ReleasedAllocations)),
			zap.Strings("deletedENIs", res.DeletedENIs), zap.Strings("adoptedENIs", res.AdoptedENIs))
	}
	return res, nil
}
