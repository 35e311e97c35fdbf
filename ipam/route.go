package ipam

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/store"
)

// VPC route mode (Terway's daemon mode "VPC"): the node owns a pod CIDR (the Node's
// spec.podCIDR, given out by kube-controller-manager's node IPAM), pods take addresses from
// it locally, as Terway's VPC mode does with host-local IPAM, and one custom entry in the VPC
// route table sends the CIDR to the node's instance, as the cloud-controller-manager's route
// controller programs it. Pod traffic leaves through the node's primary NIC. No ENI is
// created and no address is assigned in the cloud: one API change per node, not per pod.

// Meta keys of the route mode in the store.
const (
	metaRouteCIDR  = "route-cidr"
	metaRouteTable = "route-table"
	metaRouteEntry = "route-entry"
	metaRouteLast  = "route-last-ip"
)

// RouteOptions configure a RoutePool.
type RouteOptions struct {
	// Cloud describes the instance and its primary ENI; Routes changes the route table.
	Cloud  aliyun.Cloud
	Routes aliyun.RouteCloud
	Store  *store.Store
	// InstanceID is this node's ECS instance, the next hop of its route entry.
	InstanceID string
	NodeName   string
	ClusterID  string
	// PodCIDR is the node's spec.podCIDR.
	PodCIDR netip.Prefix
	// RouteTableID overrides the VPC's system route table (found with DescribeRouteTableList).
	RouteTableID string
	// CheckInterval is the period of the background check that the entry is still there
	// (default 1m, jittered by ±LoopJitter); a missing entry is created again.
	CheckInterval time.Duration
	// ListingGrace is how long DescribeRouteEntryList may lag behind CreateRouteEntry and
	// DeleteRouteEntry (default 10s): an entry the cloud accepted is waited for that long
	// before its absence from the listing counts.
	ListingGrace time.Duration
	Logger       *zap.Logger
	Now          func() time.Time
}

// RoutePool hands out the addresses of the node's pod CIDR and keeps the node's VPC route
// entry. Create it with NewRoutePool, then Start; it is safe for concurrent use.
type RoutePool struct {
	opts RouteOptions
	log  *zap.Logger
	m    *metrics
	// available is 1 while the node's route entry is Available.
	available prometheus.Gauge

	opMu sync.Mutex // serialises route entry changes

	mu      sync.Mutex
	started bool
	table   string
	entryID string
	primary ENIInfo
	allocs  map[string]*routeAlloc // PodKey.key() → allocation
	byIP    map[netip.Addr]string  // address → PodKey.key()
	last    netip.Addr             // the last address handed out; the next search starts after it
	first   netip.Addr
	final   netip.Addr

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

type routeAlloc struct {
	key PodKey
	ip  netip.Addr
}

// NewRoutePool checks opts; it makes no call.
func NewRoutePool(o RouteOptions) (*RoutePool, error) {
	var errs []error
	if o.Cloud == nil || o.Routes == nil || o.Store == nil {
		errs = append(errs, errors.New("route mode: Cloud, Routes and Store are required"))
	}
	if o.InstanceID == "" || o.NodeName == "" {
		errs = append(errs, errors.New("route mode: InstanceID and NodeName are required"))
	}
	if !o.PodCIDR.IsValid() || !o.PodCIDR.Addr().Is4() || o.PodCIDR.Bits() > 30 || o.PodCIDR.Masked() != o.PodCIDR {
		errs = append(errs, fmt.Errorf("route mode: pod CIDR %q is not a canonical IPv4 CIDR of at least 4 addresses; "+
			"give the Node a spec.podCIDR (kube-controller-manager --allocate-node-cidrs --cluster-cidr=...)", o.PodCIDR))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.CheckInterval <= 0 {
		o.CheckInterval = time.Minute
	}
	if o.ListingGrace <= 0 {
		o.ListingGrace = 10 * time.Second
	}
	if o.ClusterID == "" {
		o.ClusterID = "default"
	}
	p := &RoutePool{opts: o, log: o.Logger, m: newMetrics(), allocs: map[string]*routeAlloc{}, byIP: map[netip.Addr]string{},
		available: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tern_ipam_route_entry_available",
			Help: "1 while the node's VPC route entry (route mode) is Available, else 0.",
		})}
	// The network and broadcast addresses are never handed out (as host-local skips them);
	// the pods' gateway is the link-local 169.254.1.1, so no address goes to a bridge.
	p.first = o.PodCIDR.Addr().Next()
	p.final = lastAddr(o.PodCIDR).Prev()
	return p, nil
}

func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v |= uint32(1)<<(32-p.Bits()) - 1
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// RouteEntryName is the name of a node's route entry, and RouteEntryDescription its
// description, from which the janitor reads cluster and node back.
func RouteEntryName(node string) string { return "tern-" + node }

// RouteEntryDescription marks an entry as the pod CIDR route of one node of one cluster.
func RouteEntryDescription(cluster, node string) string { return "tern:" + cluster + "/" + node }

func parseRouteDescription(d string) (cluster, node string, ok bool) {
	rest, ok := strings.CutPrefix(d, "tern:")
	if !ok {
		return "", "", false
	}
	cluster, node, ok = strings.Cut(rest, "/")
	return cluster, node, ok && cluster != "" && node != ""
}

// Start loads the allocations, makes sure the node's route entry exists and is Available
// (creating it, or finishing a create a crash interrupted), and starts the background check.
// It fails — and the agent retries — while the entry is not Available: pods on a node whose
// pod CIDR is not routed would be unreachable from other nodes.
func (p *RoutePool) Start(ctx context.Context) error {
	snap, err := p.opts.Store.Load()
	if err != nil {
		return err
	}
	if len(snap.ENIs) > 0 {
		return fmt.Errorf("route mode: the IPAM store %s holds %d ENIs of the ENIIP mode; drain the node and move the store aside before switching modes",
			p.opts.Store.Path(), len(snap.ENIs))
	}
	if c := snap.Meta[metaRouteCIDR]; c != "" && c != p.opts.PodCIDR.String() && len(snap.Allocations) > 0 {
		return fmt.Errorf("route mode: the store's %d allocations are from pod CIDR %s but the Node now has %s; drain the node (or restore its podCIDR) first",
			len(snap.Allocations), c, p.opts.PodCIDR)
	}
	inst, err := p.opts.Cloud.Instance(ctx, p.opts.InstanceID)
	if err != nil {
		return fmt.Errorf("route mode: describe instance %s: %w", p.opts.InstanceID, err)
	}
	primary, err := p.primaryENI(ctx, inst)
	if err != nil {
		return err
	}
	table := p.opts.RouteTableID
	if table == "" {
		if table, err = p.opts.Routes.SystemRouteTable(ctx, inst.VPCID); err != nil {
			return fmt.Errorf("route mode: find the route table of VPC %s: %w", inst.VPCID, err)
		}
	}
	p.mu.Lock()
	p.table, p.primary = table, primary
	p.allocs, p.byIP = map[string]*routeAlloc{}, map[netip.Addr]string{}
	for _, a := range snap.Allocations {
		k := PodKey{Namespace: a.Namespace, Name: a.Name, ContainerID: a.ContainerID}
		if !p.opts.PodCIDR.Contains(a.IP) {
			p.log.Warn("dropping an allocation outside the pod CIDR", zap.Stringer("pod", k), zap.Stringer("ip", a.IP))
			continue
		}
		if other, dup := p.byIP[a.IP]; dup {
			// Cannot happen with this code (one transaction per allocation, checked under
			// the lock), but a store edited by hand must not make two pods share an address.
			p.mu.Unlock()
			return fmt.Errorf("route mode: the store gives %s to both %s and %s; move the store aside", a.IP, other, k.key())
		}
		p.allocs[k.key()] = &routeAlloc{key: k, ip: a.IP}
		p.byIP[a.IP] = k.key()
	}
	p.last, _ = netip.ParseAddr(snap.Meta[metaRouteLast])
	p.mu.Unlock()

	p.opMu.Lock()
	err = p.ensureRoute(ctx, snap)
	p.opMu.Unlock()
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.started = true
	p.publishLocked()
	p.mu.Unlock()

	bg, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	p.wg.Add(1)
	go func() { defer p.wg.Done(); p.loop(bg) }()
	p.log.Info("route mode ready", zap.Stringer("podCIDR", p.opts.PodCIDR), zap.String("routeTable", table),
		zap.String("entry", p.entryID), zap.Int("allocations", len(p.allocs)))
	return nil
}

// primaryENI finds the instance's primary ENI: pods leave through it.
func (p *RoutePool) primaryENI(ctx context.Context, inst aliyun.Instance) (ENIInfo, error) {
	enis, err := p.opts.Cloud.ListENIs(ctx, aliyun.ENIFilter{InstanceID: inst.ID})
	if err != nil {
		return ENIInfo{}, fmt.Errorf("route mode: list the ENIs of %s: %w", inst.ID, err)
	}
	for _, e := range enis {
		if e.Type != aliyun.TypePrimary {
			continue
		}
		vs, err := p.opts.Cloud.VSwitches(ctx, []string{e.VSwitchID})
		if err != nil || len(vs) != 1 {
			return ENIInfo{}, fmt.Errorf("route mode: describe vSwitch %s of the primary ENI %s: %w", e.VSwitchID, e.ID, err)
		}
		// PrimaryIP stays empty: it is the node's own address, never a pod's, and the CNI
		// must not touch it.
		return ENIInfo{ID: e.ID, MAC: e.MAC, Gateway: aliyun.Gateway(vs[0].CIDR), VSwitchID: e.VSwitchID,
			VSwitchCIDR: vs[0].CIDR, NodePrimary: true}, nil
	}
	return ENIInfo{}, fmt.Errorf("route mode: instance %s lists no primary ENI: %w", inst.ID, aliyun.ErrNotFound)
}

// ensureRoute makes the node's entry exist, pointing at this instance, and waits until it is
// Available. Every create goes through an intent whose token is the ClientToken, so a crash
// between the call and the record replays the same create rather than adding a second one.
//
// The listing lags behind the calls (docs/ipam.md "VPC route mode"), so it only advises: an
// entry it does not show may exist (created just before a crash), and one it shows may be
// gone (deleted just now, a departed node's). The create decides, acting on the true table:
// when the listing shows no entry of ours, the agent creates one even if the listing shows
// another instance's entry for the CIDR, and InvalidCIDRBlock.Duplicate sends it back to
// the listing, waited for up to ListingGrace, to see whose entry it is.
func (p *RoutePool) ensureRoute(ctx context.Context, snap store.Snapshot) error {
	dst, table := p.opts.PodCIDR, p.currentTable()
	var pending *store.Intent
	for i := range snap.Intents {
		in := snap.Intents[i]
		if in.Kind != store.IntentCreateRoute {
			continue
		}
		if in.Route == dst && in.RouteTableID == table && pending == nil {
			pending = &in
			continue
		}
		// An interrupted create for another CIDR or table: the janitor removes what it
		// may have created once its node is gone; here the record just goes.
		p.log.Warn("dropping a create-route intent for another pod CIDR or table", zap.Stringer("route", in.Route), zap.String("table", in.RouteTableID))
		if err := p.opts.Store.DeleteIntent(in.Token); err != nil {
			return err
		}
	}
	entries, err := p.opts.Routes.RouteEntries(ctx, table, aliyun.RouteFilter{Destination: dst})
	if err != nil {
		return fmt.Errorf("route mode: list route entries for %s in %s: %w", dst, table, err)
	}
	var ours, other *aliyun.RouteEntry
	for i := range entries {
		if entries[i].NextHopID == p.opts.InstanceID {
			ours = &entries[i]
		} else {
			other = &entries[i]
		}
	}
	if ours == nil && pending == nil {
		if other != nil {
			p.log.Info("the listing shows another instance's entry for the pod CIDR; creating ours, the cloud refuses if that entry still exists",
				zap.Stringer("podCIDR", dst), zap.String("entry", other.ID), zap.String("nextHop", other.NextHopID))
		}
		pending = &store.Intent{Token: newToken(), Kind: store.IntentCreateRoute, Route: dst, RouteTableID: table, Created: p.opts.Now()}
		if err := p.opts.Store.PutIntent(*pending); err != nil {
			return err
		}
	}
	created := "" // the entry a create returned, which the listing must show
	if pending != nil {
		// Also when the listing shows the entry: the replay with the same token is
		// harmless and settles the intent.
		id, err := p.opts.Routes.CreateRouteEntry(ctx, aliyun.CreateRouteRequest{TableID: table, Destination: dst, InstanceID: p.opts.InstanceID,
			Name: RouteEntryName(p.opts.NodeName), Description: RouteEntryDescription(p.opts.ClusterID, p.opts.NodeName), Token: pending.Token})
		switch {
		case err == nil:
			// The entry's ID and the intent's end are one transaction.
			err = p.opts.Store.Update(func(tx *store.Tx) error {
				return errors.Join(tx.SetMeta(metaRouteEntry, id), tx.SetMeta(metaRouteCIDR, dst.String()),
					tx.SetMeta(metaRouteTable, table), tx.DeleteIntent(pending.Token))
			})
			if err != nil {
				return err
			}
			snap.Meta = map[string]string{metaRouteEntry: id, metaRouteCIDR: dst.String(), metaRouteTable: table}
			created = id
		case errors.Is(err, aliyun.ErrConflict):
			// The table has an entry for the CIDR that this token did not create: ours
			// from an earlier run (its intent settled, or a token the cloud forgot), not
			// listed yet, or another instance's. The wait below tells which.
			// The call created nothing: its intent goes.
			p.log.Info("the route table already has an entry for the pod CIDR; reading the listing to see whose", zap.Stringer("podCIDR", dst), zap.Error(err))
			if err := p.opts.Store.DeleteIntent(pending.Token); err != nil {
				return err
			}
		default:
			if !outcomeUnknown(ctx, err) {
				// Refused: the intent goes, the error stays (a bad CIDR, a full table).
				_ = p.opts.Store.DeleteIntent(pending.Token)
			}
			return fmt.Errorf("route mode: create the route entry %s → %s in %s: %w", dst, p.opts.InstanceID, table, err)
		}
	}
	e, err := p.opts.Routes.WaitRouteEntry(ctx, table, dst, aliyun.RouteWait{Present: true, ID: created, Unlisted: p.opts.ListingGrace})
	if err == nil && e.NextHopID != p.opts.InstanceID {
		err = fmt.Errorf("route mode: pod CIDR %s is already routed to %s %s (entry %s) in %s: two nodes were given one pod CIDR, or a stale entry remains; delete it or fix the Node's podCIDR",
			dst, e.NextHopType, e.NextHopID, e.ID, table)
	} else if err != nil {
		err = fmt.Errorf("route mode: wait for the route entry %s → %s to be Available: %w", dst, p.opts.InstanceID, err)
	}
	if err != nil {
		p.available.Set(0)
		return err
	}
	if snap.Meta[metaRouteEntry] != e.ID || snap.Meta[metaRouteCIDR] != dst.String() || snap.Meta[metaRouteTable] != table {
		if err := p.opts.Store.Update(func(tx *store.Tx) error {
			return errors.Join(tx.SetMeta(metaRouteEntry, e.ID), tx.SetMeta(metaRouteCIDR, dst.String()), tx.SetMeta(metaRouteTable, table))
		}); err != nil {
			return err
		}
	}
	p.available.Set(1)
	p.mu.Lock()
	p.entryID = e.ID
	p.mu.Unlock()
	return nil
}

func (p *RoutePool) currentTable() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.table
}

// loop checks the route entry every CheckInterval (jittered) and creates it again if it is
// gone: someone deleted it, or the VPC was restored.
func (p *RoutePool) loop(ctx context.Context) {
	rnd := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0x726f757465))
	for {
		t := time.NewTimer(Jitter(p.opts.CheckInterval, LoopJitter, rnd))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if err := p.checkRoute(ctx); err != nil && ctx.Err() == nil {
			p.log.Warn("route entry check failed; retrying next period", zap.Error(err))
		}
	}
}

func (p *RoutePool) checkRoute(ctx context.Context) error {
	snap, err := p.opts.Store.Load()
	if err != nil {
		return err
	}
	p.opMu.Lock()
	defer p.opMu.Unlock()
	return p.ensureRoute(ctx, snap)
}

// Stop ends the background check; later Allocate calls fail with ErrNotStarted.
func (p *RoutePool) Stop() {
	p.mu.Lock()
	p.started = false
	p.mu.Unlock()
	if p.cancel != nil {
		p.cancel()
	}
	p.wg.Wait()
}

// Allocate implements Allocator: the next free address after the last one handed out, so a
// released address is reused as late as possible (as host-local does), persisted (fsync)
// before it returns.
func (p *RoutePool) Allocate(ctx context.Context, key PodKey) (Allocation, error) {
	start := time.Now()
	a, err := p.allocate(key)
	p.m.allocDuration.Observe(time.Since(start).Seconds())
	if err != nil {
		p.m.errors.WithLabelValues(causeOf(err)).Inc()
	}
	return a, err
}

func (p *RoutePool) allocate(key PodKey) (Allocation, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.started {
		return Allocation{}, ErrNotStarted
	}
	if a, ok := p.allocs[key.key()]; ok {
		return Allocation{IP: a.ip, ENI: p.primary}, nil
	}
	ip := p.nextFreeLocked()
	if !ip.IsValid() {
		return Allocation{}, fmt.Errorf("%w: every address of pod CIDR %s is in use (%d pods)", ErrNodeFull, p.opts.PodCIDR, len(p.allocs))
	}
	rec := store.Allocation{Namespace: key.Namespace, Name: key.Name, ContainerID: key.ContainerID, IP: ip,
		ENIID: p.primary.ID, Allocated: p.opts.Now()}
	// The lock is held across the fsync: two allocations can never pick one address, and
	// an address is recorded before any pod hears of it.
	if err := p.opts.Store.Update(func(tx *store.Tx) error {
		return errors.Join(tx.PutAllocation(rec), tx.SetMeta(metaRouteLast, ip.String()))
	}); err != nil {
		return Allocation{}, fmt.Errorf("record the allocation of %s to %s: %w", ip, key, err)
	}
	p.allocs[key.key()] = &routeAlloc{key: key, ip: ip}
	p.byIP[ip] = key.key()
	p.last = ip
	p.publishLocked()
	return Allocation{IP: ip, ENI: p.primary}, nil
}

func (p *RoutePool) nextFreeLocked() netip.Addr {
	ip := p.first
	if p.last.IsValid() && p.opts.PodCIDR.Contains(p.last) && p.last.Less(p.final) && !p.last.Less(p.first) {
		ip = p.last.Next()
	}
	for range p.size() {
		if _, used := p.byIP[ip]; !used {
			return ip
		}
		if ip == p.final {
			ip = p.first
		} else {
			ip = ip.Next()
		}
	}
	return netip.Addr{}
}

// size is how many addresses the pod CIDR gives pods.
func (p *RoutePool) size() int { return 1<<(32-p.opts.PodCIDR.Bits()) - 2 }

// Release implements Allocator.
func (p *RoutePool) Release(ctx context.Context, key PodKey) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	a, ok := p.allocs[key.key()]
	if !ok {
		return nil
	}
	if err := p.opts.Store.DeleteAllocation(key.key()); err != nil {
		return fmt.Errorf("release %s of %s: %w", a.ip, key, err)
	}
	delete(p.allocs, key.key())
	delete(p.byIP, a.ip)
	p.publishLocked()
	return nil
}

// Allocations implements Allocator.
func (p *RoutePool) Allocations() map[PodKey]Allocation {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[PodKey]Allocation, len(p.allocs))
	for _, a := range p.allocs {
		out[a.key] = Allocation{IP: a.ip, ENI: p.primary}
	}
	return out
}

// GC implements Allocator: releases the allocations of gone pods, then checks the route
// entry (and creates it again if it is gone).
func (p *RoutePool) GC(ctx context.Context, livePods func() map[string]bool) (GCResult, error) {
	var res GCResult
	if livePods == nil {
		return res, errors.New("route mode GC: no live pod set; refusing to treat every pod as gone")
	}
	live := livePods()
	for k := range p.Allocations() {
		if live[k.Namespace+"/"+k.Name] {
			continue
		}
		if err := p.Release(ctx, k); err != nil {
			return res, err
		}
		res.ReleasedAllocations = append(res.ReleasedAllocations, k)
	}
	return res, p.checkRoute(ctx)
}

// Status implements Allocator. The primary ENI stands for the node: it carries the pods'
// traffic and the "ENI" of every allocation.
func (p *RoutePool) Status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := Status{Capacity: Capacity{MaxPods: p.size()}, InUse: len(p.allocs), Idle: p.size() - len(p.allocs), PodCIDR: p.opts.PodCIDR}
	if p.primary.ID != "" {
		es := ENIStatus{ENIInfo: p.primary}
		for ip := range p.byIP {
			es.IPs = append(es.IPs, ip)
			es.InUse = append(es.InUse, ip)
		}
		s.ENIs = []ENIStatus{es}
	}
	return s
}

// UpdateConfig implements Allocator; nothing of eni_conf applies to the route mode.
func (p *RoutePool) UpdateConfig(eniconfig.Config) {}

// Collectors implements Allocator.
func (p *RoutePool) Collectors() []prometheus.Collector {
	return []prometheus.Collector{p.m.ips, p.m.allocDuration, p.m.errors, p.available}
}

// Route describes the node's entry: table, entry ID and pod CIDR.
func (p *RoutePool) Route() (table, entryID string, podCIDR netip.Prefix) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.table, p.entryID, p.opts.PodCIDR
}

func (p *RoutePool) publishLocked() {
	p.m.ips.WithLabelValues("idle").Set(float64(p.size() - len(p.allocs)))
	p.m.ips.WithLabelValues("in_use").Set(float64(len(p.allocs)))
}

// DeleteDepartedRoutes deletes the route entries of cluster's nodes that are not in live
// (a Node object that was deleted): the job kube-controller-manager's route controller does
// with a cloud provider. Entries of other clusters, and entries tern did not create, are left
// alone. It returns the entries deleted.
func DeleteDepartedRoutes(ctx context.Context, rc aliyun.RouteCloud, table, cluster string, live map[string]bool, log *zap.Logger) ([]aliyun.RouteEntry, error) {
	if live == nil {
		return nil, errors.New("delete departed routes: no live node set; refusing to treat every node as gone")
	}
	if log == nil {
		log = zap.NewNop()
	}
	entries, err := rc.RouteEntries(ctx, table, aliyun.RouteFilter{})
	if err != nil {
		return nil, fmt.Errorf("list the route entries of %s: %w", table, err)
	}
	var deleted []aliyun.RouteEntry
	var errs []error
	for _, e := range entries {
		c, node, ok := parseRouteDescription(e.Description)
		if !ok || c != cluster || live[node] {
			continue
		}
		if err := rc.DeleteRouteEntry(ctx, table, e.ID); err != nil {
			errs = append(errs, fmt.Errorf("delete the route entry %s (%s) of departed node %s: %w", e.ID, e.Destination, node, err))
			continue
		}
		log.Info("deleted the route entry of a departed node", zap.String("node", node), zap.Stringer("podCIDR", e.Destination), zap.String("entry", e.ID))
		deleted = append(deleted, e)
	}
	return deleted, errors.Join(errs...)
}
