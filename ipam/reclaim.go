package ipam

import (
	"context"
	"net/netip"
	"slices"
	"sort"

	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/store"
)

// reclaim gives idle addresses back to the cloud: those above max_pool_size, and those idle
// longer than idle_ip_reclaim_after down to min_pool_size. An ENI's primary address is never
// unassigned; it goes with its ENI. It prefers addresses on the ENIs with
// the fewest pods, and deletes an ENI outright when no pod uses it and the pool keeps
// min_pool_size without it. It runs with opMu held.
func (p *Pool) reclaim(ctx context.Context) {
	type plan struct {
		eni    *eniState
		ips    []netip.Addr
		delete bool
	}
	p.mu.Lock()
	cfg := p.cfg
	now := p.now()
	idle, expired := 0, 0
	for _, e := range p.enis {
		for _, ip := range e.ips {
			if ip.owner == "" && !ip.releasing {
				idle++
				if cfg.IdleIPReclaimAfter > 0 && now.Sub(ip.idleSince) >= cfg.IdleIPReclaimAfter {
					expired++
				}
			}
		}
	}
	n := reclaimCount(idle, expired, cfg.MinPoolSize, cfg.MaxPoolSize)
	enis := p.sortedENIsLocked()
	sort.SliceStable(enis, func(i, j int) bool {
		ui, ii := enis[i].counts()
		uj, ij := enis[j].counts()
		if ui != uj {
			return ui < uj
		}
		return ii < ij
	})
	onlyExpired := idle <= cfg.MaxPoolSize // not over max: only expired addresses may go
	var plans []plan
	remaining := idle
	for _, e := range enis {
		used, eidle := e.counts()
		var cands []netip.Addr
		for _, a := range e.sortedIPs() {
			ip := e.ips[a]
			if ip.owner != "" || ip.releasing {
				continue
			}
			if onlyExpired && now.Sub(ip.idleSince) < cfg.IdleIPReclaimAfter {
				continue
			}
			cands = append(cands, a)
		}
		sort.SliceStable(cands, func(i, j int) bool { return e.ips[cands[i]].idleSince.Before(e.ips[cands[j]].idleSince) })
		// The ENI's primary address cannot be unassigned (the cloud refuses): it is given back
		// only by deleting the ENI.
		secondary := slices.DeleteFunc(slices.Clone(cands), func(a netip.Addr) bool { return e.ips[a].primary })
		var pl plan
		switch {
		case cfg.HotPlug && used == 0 && eidle > 0 && len(cands) == eidle && eidle == len(e.ips) &&
			p.waiting == 0 && remaining-eidle >= cfg.MinPoolSize:
			// No pod uses this ENI and the pool stays at or above min without it: give the
			// whole ENI back (one detach+delete instead of unassigns, and one ENI fewer),
			// even if that takes the pool below max.
			pl = plan{eni: e, ips: cands, delete: true}
		case n > 0 && len(secondary) > 0:
			pl = plan{eni: e, ips: secondary[:min(n, len(secondary))]}
		default:
			continue
		}
		for _, a := range pl.ips {
			e.ips[a].releasing = true
		}
		n = max(n-len(pl.ips), 0)
		remaining -= len(pl.ips)
		plans = append(plans, pl)
	}
	if len(plans) == 0 {
		p.mu.Unlock()
		return
	}
	p.publishLocked()
	p.mu.Unlock()

	for _, pl := range plans {
		var err error
		var unsure []netip.Addr // addresses of a call whose outcome is unknown
		if pl.delete {
			if err = p.deleteOwnedENI(ctx, pl.eni); err != nil {
				unsure = pl.ips // the ENI may be detached already: its deletion is replayed
			}
		} else {
			unsure, err = p.unassign(ctx, pl.eni, pl.ips)
		}
		if err != nil {
			if ctx.Err() == nil {
				p.log.Warn("reclaim failed; addresses whose removal is uncertain stay held back until its replay, the others stay in the pool",
					zap.String("eni", pl.eni.info.ID), zap.Stringers("uncertain", unsure), zap.Error(err))
			}
			// An address whose unassign may have happened must never be handed out: it stays
			// releasing until the intent's replay removes it.
			p.mu.Lock()
			for _, a := range pl.ips {
				if ip, ok := pl.eni.ips[a]; ok && !slices.Contains(unsure, a) {
					ip.releasing = false
				}
			}
			p.publishLocked()
			p.mu.Unlock()
		}
	}
}

// unassign removes idle addresses from an ENI, at most aliyun.MaxIPsPerCall per call. On
// failure it returns the addresses of the call whose outcome is unknown (their intent stays
// for the replay), if that is what failed.
func (p *Pool) unassign(ctx context.Context, e *eniState, ips []netip.Addr) ([]netip.Addr, error) {
	id := e.info.ID
	for len(ips) > 0 {
		chunk := ips[:min(len(ips), aliyun.MaxIPsPerCall)]
		ips = ips[len(chunk):]
		intent := store.Intent{Token: newToken(), Kind: store.IntentUnassignIPs, ENIID: id, IPs: chunk, Created: p.now()}
		if err := p.st.PutIntent(intent); err != nil {
			return nil, err
		}
		if err := p.cloud.UnassignPrivateIPs(ctx, id, chunk); err != nil {
			p.settleFailedIntent(ctx, intent, err)
			if outcomeUnknown(ctx, err) {
				return chunk, err
			}
			return nil, err
		}
		p.removeIPs(id, chunk, intent.Token)
		p.log.Info("released idle IPs", zap.String("eni", id), zap.Int("count", len(chunk)))
	}
	return nil, nil
}

// deleteOwnedENI detaches and deletes an ENI of the pool that no pod uses.
func (p *Pool) deleteOwnedENI(ctx context.Context, e *eniState) error {
	id := e.info.ID
	intent := store.Intent{Token: newToken(), Kind: store.IntentDeleteENI, ENIID: id, Created: p.now()}
	if err := p.st.PutIntent(intent); err != nil {
		return err
	}
	if err := p.destroyENI(ctx, id); err != nil {
		// Whatever failed, the pool gave the ENI up; the intent's replay finishes the job.
		p.scheduleVerify()
		return err
	}
	p.forgetENI(id, intent.Token)
	p.log.Info("deleted empty ENI", zap.String("eni", id))
	return nil
}
