package ipam

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"

	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/store"
)

// newToken is a ClientToken: unique per logical operation, recorded in the intent before the
// call and reused by every retry of it.
func newToken() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return "tern-" + hex.EncodeToString(b[:])
}

// fill grows the pool until nobody waits and the idle count reaches the target. It runs with
// opMu held. One pass serves every request that arrived before it asked the cloud: that is the
// batching, since Allocate calls only register as waiters.
func (p *Pool) fill(ctx context.Context) {
	exhaustedRetries := 0
	for ctx.Err() == nil {
		p.mu.Lock()
		cfg := p.cfg
		idle := p.idleLocked()
		target := max(cfg.MinPoolSize, p.warmUp)
		if p.warmUp > 0 && idle >= p.warmUp {
			p.warmUp = 0
			target = cfg.MinPoolSize
			p.mu.Unlock()
			if err := p.st.Update(func(tx *store.Tx) error { return tx.SetMeta("warmed-up", p.now().UTC().Format("2006-01-02T15:04:05Z")) }); err != nil {
				p.log.Warn("cannot record warm-up completion; it will run again after a restart", zap.Error(err))
			}
			p.mu.Lock()
		}
		e, room := p.eniWithRoomLocked()
		if e == nil {
			room = min(p.perENI(), aliyun.MaxIPsPerCall)
		}
		n := batchSize(p.waiting, idle, target, max(cfg.MaxPoolSize, target), room)
		var eniID string
		if e != nil {
			eniID = e.info.ID
		}
		p.mu.Unlock()
		if n == 0 {
			return
		}

		var err error
		if eniID != "" {
			err = p.assign(ctx, eniID, n)
			if err != nil && (errors.Is(err, aliyun.ErrVSwitchExhausted) || errors.Is(err, aliyun.ErrQuota)) {
				// This ENI cannot grow by n: its vSwitch has fewer free addresses, or the ENI
				// is at the instance type's limit. Refresh the vSwitch's free count (a smaller
				// batch may still fit), or remember the ENI as full, and try again.
				exhaustedRetries++
				vsw := e.info.VSwitchID
				var fresh []aliyun.VSwitch
				var verr error
				if errors.Is(err, aliyun.ErrVSwitchExhausted) {
					fresh, verr = p.cloud.VSwitches(ctx, []string{vsw})
				}
				p.mu.Lock()
				switch {
				case !errors.Is(err, aliyun.ErrVSwitchExhausted):
					e.full = true
				case verr != nil || len(fresh) != 1 || fresh[0].Available == 0 || exhaustedRetries > 3:
					p.exhausted[vsw] = true
				default:
					p.setVSwitchLocked(fresh[0])
				}
				p.mu.Unlock()
				p.log.Info("ENI cannot take more addresses", zap.String("eni", eniID), zap.Int("wanted", n), zap.Error(err))
				continue
			}
		} else {
			err = p.growENI(ctx, n)
		}
		p.mu.Lock()
		if err != nil {
			p.fillErr = err
			p.fillGen++
		} else {
			p.fillErr = nil
		}
		p.publishLocked()
		p.mu.Unlock()
		if err != nil {
			if ctx.Err() == nil {
				p.log.Warn("pool refill failed", zap.Int("wanted", n), zap.Error(err))
			}
			return
		}
	}
}

// perENI is how many addresses one ENI may hold, its primary included (every one serves a pod).
func (p *Pool) perENI() int { return max(p.limits.IPsPerENI, 0) }

// eniWithRoomLocked picks the ENI to grow: the fullest one that still has room and whose
// vSwitch is not known to be exhausted, so ENIs fill up one after another.
func (p *Pool) eniWithRoomLocked() (*eniState, int) {
	var best *eniState
	bestRoom := 0
	for _, e := range p.sortedENIsLocked() {
		room := p.perENI() - len(e.ips)
		if v, ok := p.vswCache[e.info.VSwitchID]; ok {
			room = min(room, v.Available)
		}
		if room <= 0 || e.full || p.exhausted[e.info.VSwitchID] {
			continue
		}
		if best == nil || room < bestRoom {
			best, bestRoom = e, room
		}
	}
	return best, bestRoom
}

// assign adds n addresses to an ENI, intent first.
func (p *Pool) assign(ctx context.Context, eniID string, n int) error {
	intent := store.Intent{Token: newToken(), Kind: store.IntentAssignIPs, ENIID: eniID, Count: n, Created: p.now()}
	if err := p.st.PutIntent(intent); err != nil {
		return fmt.Errorf("record intent to assign %d IPs to %s: %w", n, eniID, err)
	}
	ips, err := p.cloud.AssignPrivateIPs(ctx, eniID, n, intent.Token)
	if err != nil {
		p.settleFailedIntent(ctx, intent, err)
		return err
	}
	// The reply is the truth about the new addresses; a listing may not show them yet.
	p.addIPs(eniID, ips, intent.Token)
	p.mu.Lock()
	if e, ok := p.enis[eniID]; ok {
		p.takeFromVSwitchLocked(e.info.VSwitchID, len(ips))
	}
	p.mu.Unlock()
	p.log.Debug("assigned IPs", zap.String("eni", eniID), zap.Int("count", len(ips)))
	return nil
}

// settleFailedIntent removes the intent of a call the cloud refused. A call whose outcome is
// unknown (cut short, or a failure that does not say) may have taken effect: its intent stays
// and is replayed with the same token by the next verify pass.
func (p *Pool) settleFailedIntent(ctx context.Context, in store.Intent, err error) {
	if outcomeUnknown(ctx, err) {
		p.scheduleVerify()
		return
	}
	if err := p.st.DeleteIntent(in.Token); err != nil {
		p.log.Warn("cannot drop intent", zap.String("token", in.Token), zap.Error(err))
	}
}

// growENI creates and attaches a new ENI with n secondary addresses.
func (p *Pool) growENI(ctx context.Context, n int) error {
	p.mu.Lock()
	cfg := p.cfg
	owned := len(p.enis)
	foreign := p.foreign
	p.mu.Unlock()
	if p.opts.OtherENIs != nil {
		foreign += p.opts.OtherENIs()
	}
	if !cfg.HotPlug {
		return fmt.Errorf("%w: every ENI is full and hot_plug is false in eni_conf", ErrNodeFull)
	}
	if owned+foreign >= p.limits.ENIs {
		return fmt.Errorf("%w: %d ENIs attached, instance type %s allows %d (%d pods)",
			ErrNodeFull, owned+foreign, p.limits.InstanceType, p.limits.ENIs, CapacityOf(p.limits).MaxPods)
	}
	zone := p.instance.ZoneID
	ids := cfg.VSwitches[zone]
	if len(ids) == 0 {
		return fmt.Errorf("eni_conf vswitches has no entry for zone %s (the node's zone); add one", zone)
	}
	vsws, err := p.vswitches(ctx, ids)
	if err != nil {
		return err
	}
	p.mu.Lock()
	exhausted := map[string]bool{}
	for k, v := range p.exhausted {
		exhausted[k] = v
	}
	order := orderVSwitches(vsws, cfg.VSwitchSelection, exhausted, p.rnd)
	p.mu.Unlock()

	var last error
	// The new ENI's primary address is one of the n the pool asked for.
	secondaries := max(n-1, 0)
	for _, id := range order {
		err := p.createENI(ctx, id, secondaries)
		if err == nil {
			return nil
		}
		if !errors.Is(err, aliyun.ErrVSwitchExhausted) {
			return err
		}
		last = err
		p.mu.Lock()
		p.exhausted[id] = true
		p.mu.Unlock()
	}
	return &VSwitchExhaustedError{Zone: zone, VSwitchIDs: append([]string(nil), ids...), Cause: last}
}

// vswitches returns the zone's vSwitches with free counts, cached for VSwitchCacheTTL.
func (p *Pool) vswitches(ctx context.Context, ids []string) ([]aliyun.VSwitch, error) {
	p.mu.Lock()
	fresh := p.vswCache != nil && p.now().Sub(p.vswAt) < p.opts.VSwitchCacheTTL
	var out []aliyun.VSwitch
	if fresh {
		for _, id := range ids {
			v, ok := p.vswCache[id]
			if !ok {
				fresh = false
				break
			}
			out = append(out, v)
		}
	}
	p.mu.Unlock()
	if fresh {
		return out, nil
	}
	out, err := p.cloud.VSwitches(ctx, ids)
	if err != nil {
		return nil, fmt.Errorf("describe vSwitches %v: %w", ids, err)
	}
	p.mu.Lock()
	if p.vswCache == nil {
		p.vswCache = map[string]aliyun.VSwitch{}
	}
	for _, v := range out {
		p.vswCache[v.ID] = v
	}
	p.vswAt = p.now()
	p.mu.Unlock()
	return out, nil
}

// vswitchCIDR returns a vSwitch's CIDR, from the cache or the cloud.
func (p *Pool) vswitchCIDR(ctx context.Context, id string) (netip.Prefix, error) {
	p.mu.Lock()
	v, ok := p.vswCache[id]
	p.mu.Unlock()
	if ok {
		return v.CIDR, nil
	}
	vs, err := p.cloud.VSwitches(ctx, []string{id})
	if err != nil {
		return netip.Prefix{}, err
	}
	p.mu.Lock()
	if p.vswCache == nil {
		p.vswCache = map[string]aliyun.VSwitch{}
	}
	p.vswCache[id] = vs[0]
	p.mu.Unlock()
	return vs[0].CIDR, nil
}

// createENI creates, records and attaches one ENI with n secondary addresses (plus its
// primary), intent first; on a failed attach it deletes the ENI again.
func (p *Pool) createENI(ctx context.Context, vswID string, n int) error {
	cidr, err := p.vswitchCIDR(ctx, vswID)
	if err != nil {
		return err
	}
	p.mu.Lock()
	cfg := p.cfg
	if v, ok := p.vswCache[vswID]; ok {
		n = max(min(n, v.Available-1), 0) // the primary address comes from the vSwitch too
	}
	p.mu.Unlock()
	intent := store.Intent{Token: newToken(), Kind: store.IntentCreateENI, VSwitchID: vswID, Count: n, Created: p.now()}
	if err := p.st.PutIntent(intent); err != nil {
		return fmt.Errorf("record intent to create an ENI on %s: %w", vswID, err)
	}
	eni, err := p.cloud.CreateENI(ctx, p.createRequest(cfg, vswID, n, intent.Token))
	if err != nil {
		p.settleFailedIntent(ctx, intent, err)
		return err
	}
	rec := store.ENI{ID: eni.ID, MAC: eni.MAC, VSwitchID: vswID, CIDR: cidr, PrimaryIP: eni.PrimaryIP, IPs: eni.Secondary, State: aliyun.StatusAvailable}
	intent.ENIID = eni.ID
	if err := p.st.Update(func(tx *store.Tx) error {
		if err := tx.PutENI(rec); err != nil {
			return err
		}
		return tx.PutIntent(intent)
	}); err != nil {
		return fmt.Errorf("record created ENI %s: %w", eni.ID, err)
	}
	attached, err := p.cloud.AttachENI(ctx, eni.ID, p.opts.InstanceID)
	if err != nil {
		err = fmt.Errorf("attach ENI %s to %s: %w", eni.ID, p.opts.InstanceID, err)
		if outcomeUnknown(ctx, err) {
			p.scheduleVerify() // the replay of the intent finishes the attach
			return err
		}
		p.log.Warn("attach failed; deleting the new ENI", zap.String("eni", eni.ID), zap.Error(err))
		if derr := p.abandonCreated(ctx, intent, eni.ID); derr != nil {
			p.log.Warn("cannot delete the unattached ENI; the replay of its intent retries", zap.String("eni", eni.ID), zap.Error(derr))
			p.scheduleVerify()
		}
		return err
	}
	if attached.MAC != "" {
		rec.MAC = attached.MAC
	}
	p.addENI(rec, intent.Token)
	p.log.Info("ENI created and attached", zap.String("eni", rec.ID), zap.String("mac", rec.MAC),
		zap.String("vSwitch", vswID), zap.Int("ips", len(rec.IPs)))
	return nil
}

// createRequest is the CreateNetworkInterface of one growth step; a replay sends the same.
func (p *Pool) createRequest(cfg eniconfig.Config, vswID string, n int, token string) aliyun.CreateENIRequest {
	tags := map[string]string{}
	for k, v := range cfg.ENITags {
		tags[k] = v
	}
	for k, v := range p.ownTags() {
		tags[k] = v
	}
	return aliyun.CreateENIRequest{
		VSwitchID: vswID, SecurityGroups: cfg.SecurityGroups, SecondaryIPs: n, Tags: tags,
		Name: "tern-" + p.opts.NodeName, Description: "tern ENIIP pool of node " + p.opts.NodeName, Token: token,
	}
}

// destroyENI detaches (if needed) and deletes an ENI.
func (p *Pool) destroyENI(ctx context.Context, id string) error {
	if err := p.cloud.DetachENI(ctx, id, p.opts.InstanceID); err != nil {
		return fmt.Errorf("detach %s: %w", id, err)
	}
	if err := p.cloud.DeleteENI(ctx, id); err != nil {
		return fmt.Errorf("delete %s: %w", id, err)
	}
	return nil
}

func (p *Pool) setVSwitchLocked(v aliyun.VSwitch) {
	if p.vswCache == nil {
		p.vswCache = map[string]aliyun.VSwitch{}
	}
	p.vswCache[v.ID] = v
}

// takeFromVSwitchLocked keeps the cached free count roughly right between refreshes.
func (p *Pool) takeFromVSwitchLocked(id string, n int) {
	if v, ok := p.vswCache[id]; ok {
		v.Available = max(v.Available-n, 0)
		p.vswCache[id] = v
	}
}
