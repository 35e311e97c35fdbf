// Package ipam is the node's ENIIP pool: it gives each pod sandbox a private IP of one of the
// node's secondary ENIs (a secondary address or the ENI's primary), keeps a warm pool of idle addresses between min_pool_size and
// max_pool_size, grows by assigning addresses in batches and by creating and attaching ENIs, and
// shrinks by unassigning idle addresses and deleting emptied ENIs.
//
// Durable state lives in ipam/store; the cloud is reached through aliyun.Cloud. Every cloud
// mutation is preceded by an intent record, and Start reconciles the store with the cloud, so a
// crash at any point loses no address and leaks none.
package ipam

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/store"
)

// PodKey identifies one pod sandbox.
type PodKey struct {
	Namespace   string
	Name        string
	ContainerID string
}

func (k PodKey) key() string { return store.AllocationKey(k.Namespace, k.Name, k.ContainerID) }

// String is namespace/name/containerID.
func (k PodKey) String() string { return k.key() }

// ENIInfo is what the datapath needs to plumb a pod behind an ENI.
type ENIInfo struct {
	ID          string
	MAC         string
	PrimaryIP   netip.Addr
	Gateway     netip.Addr
	VSwitchID   string
	VSwitchCIDR netip.Prefix
	// NodePrimary marks the instance's primary ENI (route mode): the node's own interface,
	// whose address and IPv6 the CNI leaves alone.
	NodePrimary bool
}

// Allocation is the address given to a pod.
type Allocation struct {
	IP  netip.Addr
	ENI ENIInfo
	// Kind is the kind of resource (Node sets it; empty from the ENIIP pool itself). With
	// KindENI, ENI is the pod's own ENI and IP its primary address.
	Kind Kind
	// ViaVeth (KindENI) are the destinations the pod reaches through its veth to the node
	// rather than its ENI: the Service CIDR and the node's address.
	ViaVeth []netip.Prefix
	// VLAN and MemberENI (KindMember): the pod's member ENI and its VLAN id on the trunk ENI,
	// which ENI then describes (its link carries the pod's traffic, tagged).
	VLAN      int
	MemberENI string
}

// Errors for the CNI.
var (
	// ErrPoolEmptyTryAgain: no idle address right now and the refill is still under way (or
	// failed transiently). The CNI maps it to error code 11 ("try again later").
	ErrPoolEmptyTryAgain = errors.New("IP pool is empty and refilling; try again")
	// ErrVSwitchExhausted: every configured vSwitch of the node's zone is out of addresses.
	// The concrete error is a *VSwitchExhaustedError naming them.
	ErrVSwitchExhausted = aliyun.ErrVSwitchExhausted
	// ErrNodeFull: the node's ENIs hold as many addresses as the instance type allows.
	ErrNodeFull = errors.New("node is at its ENIIP capacity")
	// ErrNotStarted: the pool is used before Start succeeded.
	ErrNotStarted = errors.New("IP pool not started")
)

// VSwitchExhaustedError names the vSwitches that have no free address.
type VSwitchExhaustedError struct {
	Zone       string
	VSwitchIDs []string
	Cause      error
}

func (e *VSwitchExhaustedError) Error() string {
	return fmt.Sprintf("no free IP address in vSwitches [%s] of zone %s; add a vSwitch with free addresses to eni_conf vswitches.%s",
		strings.Join(e.VSwitchIDs, " "), e.Zone, e.Zone)
}

// Is makes errors.Is(err, ErrVSwitchExhausted) true.
func (e *VSwitchExhaustedError) Is(target error) bool { return target == ErrVSwitchExhausted }

// Unwrap returns the last cloud error.
func (e *VSwitchExhaustedError) Unwrap() error { return e.Cause }

// Options configure a Pool.
type Options struct {
	Cloud  aliyun.Cloud
	Store  *store.Store
	Config eniconfig.Config
	// InstanceID is this node's ECS instance; NodeName and ClusterID go into the tags that
	// mark ENIs as ours.
	InstanceID string
	NodeName   string
	ClusterID  string
	Logger     *zap.Logger

	// AllocateWait bounds how long Allocate waits for a refill before ErrPoolEmptyTryAgain
	// (default 10s; the caller's context may cut it shorter).
	AllocateWait time.Duration
	// BatchWindow is how long the filler lets concurrent requests gather before asking the
	// cloud (default 20ms).
	BatchWindow time.Duration
	// MaintainInterval is the period of the background refill/reclaim pass (default 10s),
	// each period jittered by ±LoopJitter.
	MaintainInterval time.Duration
	// VSwitchCacheTTL bounds the age of vSwitch free counts (default 1m).
	VSwitchCacheTTL time.Duration
	// ListingGrace is how long DescribeNetworkInterfaces may lag behind the calls that change
	// ENIs (default 10s). The pool acts on a disagreement between itself and a listing only
	// when a listing this much later still shows it; it must exceed the cloud's real lag.
	ListingGrace time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
	// LivePods names the addresses this node's live pods hold (recover.go). It is asked only
	// after a start on an empty store, whose recovered addresses are held until it answers.
	// Nil: the caller knows of no live pod, and the recovered addresses are idle at once.
	LivePods LivePodsFunc
	// OtherENIs counts the instance's ENIs other kinds hold (exclusive ENIs): they share
	// EniQuantity with the pool. Nil counts none.
	OtherENIs func() int
}

// Tag keys that mark an ENI as created by tern for one node.
const (
	TagCreator     = "creator"
	TagCreatorTern = "tern"
	TagCluster     = "tern.io/cluster"
	TagNode        = "tern.io/node"
)

// Pool is the ENIIP pool of one node. Create it with New, then Start; Stop ends its background
// work. It is safe for concurrent use.
type Pool struct {
	cloud aliyun.Cloud
	st    *store.Store
	opts  Options
	log   *zap.Logger
	now   func() time.Time
	m     *metrics

	instance aliyun.Instance
	limits   aliyun.Limits

	// opMu serialises everything that mutates the cloud (fill, reclaim, GC, reconcile) so no
	// two of them race on the same ENI.
	opMu sync.Mutex

	mu        sync.Mutex
	started   bool
	cfg       eniconfig.Config
	enis      map[string]*eniState
	allocs    map[string]*allocState
	foreign   int // ENIs on the instance that are not ours (the primary included)
	waiting   int
	changed   chan struct{} // closed and replaced on every change
	fillErr   error
	fillGen   uint64 // incremented with every failed fill
	exhausted map[string]bool
	vswCache  map[string]aliyun.VSwitch
	vswAt     time.Time
	warmUp    int // extra idle target until the first warm-up completes
	rnd       *rand.Rand
	// suspects are disagreements between the pool and a listing, with the time of the listing
	// that first showed each (see compareWithListing).
	suspects    map[suspectKey]time.Time
	verifyTimer *time.Timer // pending kickVerify, at most one
	// recovering: addresses of ENIs adopted on an empty store are held (recoveringOwner)
	// until Options.LivePods answers (recover.go).
	recovering bool

	kickFill    chan struct{}
	kickReclaim chan struct{}
	kickVerify  chan struct{}
	cancel      context.CancelFunc
	wg          sync.WaitGroup
}

type eniState struct {
	info store.ENI
	ips  map[netip.Addr]*ipState
	full bool // the cloud refused more addresses on it (instance type limit)
}

type ipState struct {
	owner     string // allocation key; "" when idle
	idleSince time.Time
	releasing bool // being unassigned: not for allocation
	// primary marks the ENI's own primary address. It serves a pod like a secondary one, but
	// the cloud cannot unassign it: it leaves only with the ENI.
	primary bool
}

// newENIState is the pool's view of an ENI record: its secondary addresses and its primary,
// all idle since now.
func newENIState(rec store.ENI, now time.Time) *eniState {
	st := &eniState{info: rec, ips: map[netip.Addr]*ipState{}}
	for _, ip := range rec.IPs {
		st.ips[ip] = &ipState{idleSince: now}
	}
	if rec.PrimaryIP.IsValid() {
		st.ips[rec.PrimaryIP] = &ipState{idleSince: now, primary: true}
	}
	return st
}

type allocState struct {
	key   PodKey
	ip    netip.Addr
	eniID string
	at    time.Time
	ready chan struct{} // closed once persisted (or failed)
	err   error
}

// New checks the options and builds a pool; it makes no cloud call.
func New(o Options) (*Pool, error) {
	if o.Cloud == nil || o.Store == nil {
		return nil, errors.New("ipam.New: Cloud and Store are required")
	}
	if o.InstanceID == "" || o.NodeName == "" {
		return nil, errors.New("ipam.New: InstanceID and NodeName are required (they scope the ENIs the pool owns)")
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.AllocateWait <= 0 {
		o.AllocateWait = 10 * time.Second
	}
	if o.BatchWindow <= 0 {
		o.BatchWindow = 20 * time.Millisecond
	}
	if o.MaintainInterval <= 0 {
		o.MaintainInterval = 10 * time.Second
	}
	if o.VSwitchCacheTTL <= 0 {
		o.VSwitchCacheTTL = time.Minute
	}
	if o.ListingGrace <= 0 {
		o.ListingGrace = 10 * time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.ClusterID == "" {
		o.ClusterID = "default" // a tag filter with an empty value would match every cluster
	}
	return &Pool{
		cloud: o.Cloud, st: o.Store, opts: o, now: o.Now,
		log:         o.Logger.With(zap.String("instance", o.InstanceID), zap.String("node", o.NodeName)),
		m:           newMetrics(),
		cfg:         o.Config,
		enis:        map[string]*eniState{},
		allocs:      map[string]*allocState{},
		changed:     make(chan struct{}),
		exhausted:   map[string]bool{},
		suspects:    map[suspectKey]time.Time{},
		rnd:         rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0x7465726e)),
		kickFill:    make(chan struct{}, 1),
		kickReclaim: make(chan struct{}, 1),
		kickVerify:  make(chan struct{}, 1),
	}, nil
}

// ENIsHeld is how many ENIs the pool holds.
func (p *Pool) ENIsHeld() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.enis)
}

// ownTags are the tags every ENI we create carries and that identify ours on listing.
func (p *Pool) ownTags() map[string]string {
	return map[string]string{TagCreator: TagCreatorTern, TagCluster: p.opts.ClusterID, TagNode: p.opts.NodeName}
}

// Start learns the instance's limits, reconciles the store with the cloud, warms the pool up
// and starts the background refill/reclaim loop. ctx bounds Start only; the loop runs until Stop.
func (p *Pool) Start(ctx context.Context) error {
	inst, err := p.cloud.Instance(ctx, p.opts.InstanceID)
	if err != nil {
		return fmt.Errorf("ipam start: describe instance %s: %w", p.opts.InstanceID, err)
	}
	lim, err := p.cloud.InstanceTypeLimits(ctx, inst.Type)
	if err != nil {
		return fmt.Errorf("ipam start: limits of instance type %s: %w", inst.Type, err)
	}
	p.instance, p.limits = inst, lim

	p.opMu.Lock()
	err = p.reconcile(ctx)
	p.opMu.Unlock()
	if err != nil {
		return fmt.Errorf("ipam start: reconcile with the cloud: %w", err)
	}

	snap, err := p.st.Load()
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.started = true
	if snap.Meta["warmed-up"] == "" {
		p.warmUp = p.cfg.IPWarmUpSize
	}
	p.publishLocked()
	p.mu.Unlock()

	// Warm up synchronously so a node reports ready with its pool filled.
	p.opMu.Lock()
	p.fill(ctx)
	p.opMu.Unlock()

	bg, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.loop(bg)
	}()
	return nil
}

// Stop ends the background loop and waits for it; later Allocate calls fail with
// ErrNotStarted. It does not close the store.
func (p *Pool) Stop() {
	p.mu.Lock()
	p.started = false
	if p.verifyTimer != nil {
		p.verifyTimer.Stop()
		p.verifyTimer = nil
	}
	p.publishLocked()
	p.mu.Unlock()
	if p.cancel != nil {
		p.cancel()
	}
	p.wg.Wait()
}

// loop runs the refill/reclaim passes: on demand (kicks) and every MaintainInterval, jittered by
// ±LoopJitter per period so that nodes started together drift apart.
func (p *Pool) loop(ctx context.Context) {
	rnd := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0x6c6f6f70))
	t := time.NewTimer(Jitter(p.opts.MaintainInterval, LoopJitter, rnd))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.kickFill:
			if !sleepCtx(ctx, p.opts.BatchWindow) {
				return
			}
			p.opMu.Lock()
			p.fill(ctx)
			p.opMu.Unlock()
		case <-p.kickReclaim:
			p.opMu.Lock()
			p.reclaim(ctx)
			p.opMu.Unlock()
		case <-p.kickVerify:
			p.opMu.Lock()
			p.verify(ctx)
			p.opMu.Unlock()
		case <-t.C:
			p.opMu.Lock()
			p.fill(ctx)
			p.reclaim(ctx)
			p.opMu.Unlock()
			t.Reset(Jitter(p.opts.MaintainInterval, LoopJitter, rnd))
		}
	}
}

func kick(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// publishLocked wakes every waiter and refreshes the gauges.
func (p *Pool) publishLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
	idle, used := 0, 0
	for _, e := range p.enis {
		for _, ip := range e.ips {
			if ip.owner != "" {
				used++
			} else if !ip.releasing {
				idle++
			}
		}
	}
	p.m.ips.WithLabelValues("idle").Set(float64(idle))
	p.m.ips.WithLabelValues("in_use").Set(float64(used))
	p.m.enis.Set(float64(len(p.enis)))
}

func (p *Pool) idleLocked() int {
	n := 0
	for _, e := range p.enis {
		for _, ip := range e.ips {
			if ip.owner == "" && !ip.releasing {
				n++
			}
		}
	}
	return n
}

// Allocate gives the pod sandbox an address; calling it again for the same key returns the
// same address. It waits for a refill up to AllocateWait (or ctx), then fails with
// ErrPoolEmptyTryAgain; a zone without free addresses yields a *VSwitchExhaustedError.
func (p *Pool) Allocate(ctx context.Context, key PodKey) (Allocation, error) {
	start := time.Now()
	a, err := p.allocate(ctx, key)
	p.m.allocDuration.Observe(time.Since(start).Seconds())
	if err != nil {
		p.m.errors.WithLabelValues(causeOf(err)).Inc()
	}
	return a, err
}

func (p *Pool) allocate(ctx context.Context, key PodKey) (Allocation, error) {
	if key.Namespace == "" || key.Name == "" || key.ContainerID == "" {
		return Allocation{}, fmt.Errorf("allocate: pod key %q needs namespace, name and container id", key.String())
	}
	timer := time.NewTimer(p.opts.AllocateWait)
	defer timer.Stop()
	k := key.key()

	p.mu.Lock()
	if !p.started {
		p.mu.Unlock()
		return Allocation{}, ErrNotStarted
	}
	startGen := p.fillGen
	for {
		if a, ok := p.allocs[k]; ok {
			ready := a.ready
			p.mu.Unlock()
			<-ready
			p.mu.Lock()
			if cur, ok := p.allocs[k]; ok && cur == a && a.err == nil {
				out := p.allocationLocked(a)
				p.mu.Unlock()
				return out, nil
			}
			continue // the other attempt failed; try ourselves
		}
		if e, ip := p.pickIdleLocked(); ip != nil {
			ip.owner = k
			a := &allocState{key: key, ip: e.addr, eniID: e.eni.info.ID, at: p.now(), ready: make(chan struct{})}
			p.allocs[k] = a
			p.publishLocked()
			p.mu.Unlock()

			err := p.st.PutAllocation(store.Allocation{Namespace: key.Namespace, Name: key.Name, ContainerID: key.ContainerID,
				IP: a.ip, ENIID: a.eniID, Allocated: a.at})

			p.mu.Lock()
			a.err = err
			close(a.ready)
			if err != nil {
				delete(p.allocs, k)
				ip.owner = ""
				ip.idleSince = p.now()
				p.publishLocked()
				p.mu.Unlock()
				return Allocation{}, fmt.Errorf("allocate %s: record allocation of %s: %w", k, a.ip, err)
			}
			out := p.allocationLocked(a)
			idle := p.idleLocked()
			minPool := p.cfg.MinPoolSize
			p.mu.Unlock()
			if idle < minPool {
				kick(p.kickFill)
			}
			return out, nil
		}
		if p.fillGen > startGen && p.fillErr != nil {
			err := p.fillErr
			p.mu.Unlock()
			return Allocation{}, waiterError(err)
		}
		p.waiting++
		ch := p.changed
		p.mu.Unlock()
		kick(p.kickFill)
		var waitErr error
		select {
		case <-ch:
		case <-ctx.Done():
			waitErr = ctx.Err()
		case <-timer.C:
			waitErr = fmt.Errorf("no address after %s", p.opts.AllocateWait)
		}
		p.mu.Lock()
		p.waiting--
		if !p.started {
			p.mu.Unlock()
			return Allocation{}, ErrNotStarted
		}
		if waitErr != nil {
			last := p.fillErr
			p.mu.Unlock()
			if last != nil {
				return Allocation{}, fmt.Errorf("%w (%v; last refill error: %v)", ErrPoolEmptyTryAgain, waitErr, last)
			}
			return Allocation{}, fmt.Errorf("%w (%v)", ErrPoolEmptyTryAgain, waitErr)
		}
	}
}

// waiterError turns a refill failure into the error Allocate returns.
func waiterError(err error) error {
	var ve *VSwitchExhaustedError
	switch {
	case errors.As(err, &ve):
		return ve
	case errors.Is(err, ErrNodeFull):
		return err
	case errors.Is(err, aliyun.ErrCredentials), errors.Is(err, aliyun.ErrForbidden):
		return err
	case errors.Is(err, aliyun.ErrBadVSwitch):
		// eni_conf names a vSwitch the cloud does not know: retrying the ADD cannot help
		// until the operator fixes the file, so the caller must see it as a config error.
		return err
	default:
		return fmt.Errorf("%w: %v", ErrPoolEmptyTryAgain, err)
	}
}

type pick struct {
	eni  *eniState
	addr netip.Addr
}

// pickIdleLocked chooses an idle address: on the ENI the selection policy prefers, the address
// idle the longest (a just-released address may still be in peers' neighbour caches).
func (p *Pool) pickIdleLocked() (pick, *ipState) {
	var best *eniState
	bestUsed := 0
	for _, e := range p.sortedENIsLocked() {
		used, idle := e.counts()
		if idle == 0 {
			continue
		}
		better := best == nil ||
			(p.cfg.ENISelection == eniconfig.ENILeastIPs && used < bestUsed) ||
			(p.cfg.ENISelection != eniconfig.ENILeastIPs && used > bestUsed)
		if better {
			best, bestUsed = e, used
		}
	}
	if best == nil {
		return pick{}, nil
	}
	var addr netip.Addr
	var st *ipState
	for _, a := range best.sortedIPs() {
		ip := best.ips[a]
		if ip.owner != "" || ip.releasing {
			continue
		}
		if st == nil || ip.idleSince.Before(st.idleSince) {
			addr, st = a, ip
		}
	}
	return pick{eni: best, addr: addr}, st
}

func (e *eniState) counts() (used, idle int) {
	for _, ip := range e.ips {
		switch {
		case ip.owner != "":
			used++
		case !ip.releasing:
			idle++
		}
	}
	return used, idle
}

func (e *eniState) sortedIPs() []netip.Addr {
	out := make([]netip.Addr, 0, len(e.ips))
	for a := range e.ips {
		out = append(out, a)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Less(out[j]) })
	return out
}

func (p *Pool) sortedENIsLocked() []*eniState {
	out := make([]*eniState, 0, len(p.enis))
	for _, e := range p.enis {
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].info.ID < out[j].info.ID })
	return out
}

func (p *Pool) allocationLocked(a *allocState) Allocation {
	out := Allocation{IP: a.ip}
	if e, ok := p.enis[a.eniID]; ok {
		out.ENI = eniInfo(e.info)
	}
	return out
}

func eniInfo(e store.ENI) ENIInfo {
	return ENIInfo{ID: e.ID, MAC: e.MAC, PrimaryIP: e.PrimaryIP, Gateway: aliyun.Gateway(e.CIDR), VSwitchID: e.VSwitchID, VSwitchCIDR: e.CIDR}
}

// Release returns the pod sandbox's address to the pool. Releasing an unknown key succeeds.
func (p *Pool) Release(ctx context.Context, key PodKey) error {
	k := key.key()
	p.mu.Lock()
	a, ok := p.allocs[k]
	p.mu.Unlock()
	if !ok {
		return nil
	}
	<-a.ready
	if a.err != nil {
		return nil
	}
	if err := p.st.DeleteAllocation(k); err != nil {
		return fmt.Errorf("release %s: delete allocation of %s: %w", k, a.ip, err)
	}
	p.mu.Lock()
	if cur, ok := p.allocs[k]; ok && cur == a {
		delete(p.allocs, k)
		if e, ok := p.enis[a.eniID]; ok {
			if ip, ok := e.ips[a.ip]; ok && ip.owner == k {
				ip.owner = ""
				ip.idleSince = p.now()
			}
		}
		p.publishLocked()
	}
	over := p.idleLocked() > p.cfg.MaxPoolSize
	p.mu.Unlock()
	if over {
		kick(p.kickReclaim)
	}
	return nil
}

// UpdateConfig applies a new eni_conf without a restart: new vSwitches, pool sizes and
// policies take effect on the next refill/reclaim, which it triggers.
func (p *Pool) UpdateConfig(cfg eniconfig.Config) {
	p.mu.Lock()
	p.cfg = cfg
	p.exhausted = map[string]bool{}
	p.vswCache = nil
	p.fillErr = nil
	p.publishLocked()
	p.mu.Unlock()
	kick(p.kickFill)
	kick(p.kickReclaim)
	p.log.Info("eni_conf applied", zap.Int("minPoolSize", cfg.MinPoolSize), zap.Int("maxPoolSize", cfg.MaxPoolSize))
}

// Capacity is the node's ENIIP capacity (valid after Start).
func (p *Pool) Capacity() Capacity { return CapacityOf(p.limits) }

// ENIStatus is one ENI as the pool sees it.
type ENIStatus struct {
	ENIInfo
	IPs   []netip.Addr // every address the pool holds on it, the ENI's primary included
	InUse []netip.Addr // those given to pods
}

// Status is a point-in-time view of the pool, for the node annotation and ternctl.
type Status struct {
	Capacity Capacity
	ENIs     []ENIStatus
	Idle     int
	InUse    int
	// The pool's sizes from eni_conf as applied now.
	MinPoolSize, MaxPoolSize int
	IdleReclaimAfter         time.Duration
	// Kinds is the capacity of every kind the node offers (Node fills it).
	Kinds []KindCapacity
	// PodCIDR is the node's pod CIDR in the VPC route mode (RoutePool), where pods' addresses
	// come from it and no ENI holds them; invalid in the ENI modes.
	PodCIDR netip.Prefix
}

// Status returns the current state.
func (p *Pool) Status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := Status{Capacity: CapacityOf(p.limits), MinPoolSize: p.cfg.MinPoolSize, MaxPoolSize: p.cfg.MaxPoolSize,
		IdleReclaimAfter: p.cfg.IdleIPReclaimAfter}
	for _, e := range p.sortedENIsLocked() {
		es := ENIStatus{ENIInfo: eniInfo(e.info)}
		for _, a := range e.sortedIPs() {
			ip := e.ips[a]
			es.IPs = append(es.IPs, a)
			if ip.owner != "" {
				es.InUse = append(es.InUse, a)
				s.InUse++
			} else if !ip.releasing {
				s.Idle++
			}
		}
		s.ENIs = append(s.ENIs, es)
	}
	return s
}

// AllocatedENIIPs maps each ENI ID to its addresses in use, the content of the Node annotation
// k8s.aliyun.com/allocated-eniips.
func (p *Pool) AllocatedENIIPs() map[string][]string { return p.Status().InUseByENI() }

// InUseByENI maps each ENI ID to the addresses pods use on it (the Node annotation).
func (s Status) InUseByENI() map[string][]string {
	out := map[string][]string{}
	for _, e := range s.ENIs {
		ips := make([]string, len(e.InUse))
		for i, a := range e.InUse {
			ips[i] = a.String()
		}
		out[e.ID] = ips
	}
	return out
}

// Allocations lists the current allocations.
func (p *Pool) Allocations() map[PodKey]Allocation {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[PodKey]Allocation, len(p.allocs))
	for _, a := range p.allocs {
		out[a.key] = p.allocationLocked(a)
	}
	return out
}
