package fixedip

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam"
)

// Pool is what the manager needs of the node's ENIIP pool (*ipam.Pool).
type Pool interface {
	ipam.Allocator
	AllocateAddress(ctx context.Context, key ipam.PodKey, ip netip.Addr, vswitchID string) (ipam.Allocation, error)
	AllocateMovable(ctx context.Context, key ipam.PodKey) (ipam.Allocation, error)
	Hold(key ipam.PodKey) (netip.Addr, bool, error)
	ForgetAddress(ip netip.Addr) error
	Zone() string
	// ENIsHeld counts the pool's ENIs; through the Manager (which embeds Pool) the node's
	// other resource kinds still see how many ENIs the ENIIP pool holds (ipam.Node).
	ENIsHeld() int
}

// Cloud is the one call the manager makes itself: taking an address off another node's ENI.
type Cloud interface {
	UnassignPrivateIPs(ctx context.Context, eniID string, ips []netip.Addr) error
}

// ErrConflict: a conditional write lost (the record changed, appeared or went meanwhile).
var ErrConflict = errors.New("the FixedIP record changed meanwhile")

// Records is the apiserver's FixedIP records. Every write is conditional on the record's
// ResourceVersion, so two nodes never both claim one address.
type Records interface {
	// Get returns the record of pod namespace/name, nil when there is none.
	Get(ctx context.Context, namespace, name string) (*Record, error)
	// Create writes a new record; ErrConflict when one exists.
	Create(ctx context.Context, r Record) (Record, error)
	// Update writes r if its ResourceVersion is current; ErrConflict otherwise.
	Update(ctx context.Context, r Record) (Record, error)
	// Delete removes r if its ResourceVersion is current (ErrConflict otherwise); a record
	// already gone is not an error.
	Delete(ctx context.Context, r Record) error
}

// Pods is what the manager reads of pods and StatefulSets.
type Pods interface {
	// Pod returns pod namespace/name of this node, not being deleted, waiting for it up to
	// ctx (the kubelet creates the object before the CNI runs, the watch may be a moment late).
	Pod(ctx context.Context, namespace, name string) (Pod, bool)
	// StatefulSet says whether the set exists and its replicas; an error when it cannot be
	// known yet (cache not synced).
	StatefulSet(namespace, name string) (SetState, error)
}

// Events records an Event on a pod, where `kubectl describe pod` shows it.
type Events interface {
	PodEvent(namespace, name string, warning bool, reason, message string)
}

// ErrTryAgain: the address cannot be given yet (another node still has it, or the cloud still
// reports it in use); the CNI answers "try again later" and the kubelet retries.
var ErrTryAgain = ipam.ErrTryAgain

// ErrWrongZone: the pod's fixed address belongs to another zone than the node's.
var ErrWrongZone = ipam.ErrWrongZone

// Options configure a Manager.
type Options struct {
	Pool    Pool
	Cloud   Cloud
	Records Records
	Pods    Pods
	Events  Events
	Node    string
	Logger  *zap.Logger
	// HoldTime is how long a deleted pod's address stays reserved for it (default 10 min).
	HoldTime time.Duration
	// AssignWait bounds the retries of an assign the cloud refuses as "in use" (the old ENI's
	// unassign settling) within one ADD (default 30 s); then the ADD is answered try again.
	AssignWait time.Duration
	// Interval is the period of the hold pass (default HoldTime/4, at most 10 s).
	Interval time.Duration
	// PodWait bounds the wait for the pod to appear in this node's pod cache (default 500 ms:
	// the kubelet learns of the pod from the same watch, so the cache is rarely behind).
	PodWait time.Duration
	Now     func() time.Time
}

// Manager is an ipam.Allocator that gives pods annotated k8s.aliyun.com/pod-ip-fixed their
// recorded address and passes every other pod to the pool.
type Manager struct {
	Pool
	o   Options
	log *zap.Logger
	ops *prometheus.CounterVec

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

var _ ipam.Allocator = (*Manager)(nil)

// New builds a Manager over a pool.
func New(o Options) (*Manager, error) {
	if o.Pool == nil || o.Cloud == nil || o.Records == nil || o.Pods == nil || o.Node == "" {
		return nil, errors.New("fixedip.New: Pool, Cloud, Records, Pods and Node are required")
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.HoldTime <= 0 {
		o.HoldTime = 10 * time.Minute
	}
	if o.AssignWait <= 0 {
		o.AssignWait = 30 * time.Second
	}
	if o.Interval <= 0 {
		o.Interval = min(o.HoldTime/4, 10*time.Second)
	}
	if o.PodWait <= 0 {
		o.PodWait = 500 * time.Millisecond
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Events == nil {
		o.Events = noEvents{}
	}
	return &Manager{Pool: o.Pool, o: o, log: o.Logger.Named("fixedip"),
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tern_ipam_fixed_ip_operations_total",
			Help: "Fixed pod address operations by kind (allocated, kept, claimed, held, released, forgotten, dropped, waited, refused, conflict, failed)."},
			[]string{"op"})}, nil
}

type noEvents struct{}

func (noEvents) PodEvent(string, string, bool, string, string) {}

// Collectors adds the manager's counter to the pool's.
func (m *Manager) Collectors() []prometheus.Collector {
	return append(m.Pool.Collectors(), m.ops)
}

// Start starts the pool, then the hold pass.
func (m *Manager) Start(ctx context.Context) error {
	if err := m.Pool.Start(ctx); err != nil {
		return err
	}
	bg, cancel := context.WithCancel(context.Background())
	m.cancel = cancel
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		rnd := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0x66697864))
		for {
			select {
			case <-bg.Done():
				return
			case <-time.After(ipam.Jitter(m.o.Interval, ipam.LoopJitter, rnd)):
			}
			m.Sweep(bg)
		}
	}()
	return nil
}

// Stop ends the hold pass, then the pool.
func (m *Manager) Stop() {
	if m.cancel != nil {
		m.cancel()
	}
	m.wg.Wait()
	m.Pool.Stop()
}

func (m *Manager) node() Node { return Node{Name: m.o.Node, Zone: m.Pool.Zone()} }

// Allocate gives a fixed pod its recorded address (or a new one it then keeps), and any other
// pod an address from the pool.
func (m *Manager) Allocate(ctx context.Context, key ipam.PodKey) (ipam.Allocation, error) {
	pctx, cancel := context.WithTimeout(ctx, m.o.PodWait)
	pod, ok := m.o.Pods.Pod(pctx, key.Namespace, key.Name)
	cancel()
	if !ok || !pod.Fixed {
		return m.Pool.Allocate(ctx, key)
	}
	if pod.StatefulSet == "" || pod.Ordinal < 0 {
		m.o.Events.PodEvent(key.Namespace, key.Name, true, "TernFixedIPIgnored",
			Annotation+` is honoured for StatefulSet pods only (a controller owner of kind StatefulSet and a name "<set>-<ordinal>"); this pod gets an ordinary address`)
		return m.Pool.Allocate(ctx, key)
	}
	for attempt := 0; ; attempt++ {
		rec, err := m.o.Records.Get(ctx, key.Namespace, key.Name)
		if err != nil {
			return ipam.Allocation{}, fmt.Errorf("%w: read FixedIP %s/%s: %v", ErrTryAgain, key.Namespace, key.Name, err)
		}
		al, err := m.allocateFixed(ctx, key, pod, rec)
		if errors.Is(err, ErrConflict) && attempt < 5 {
			continue // another writer won: decide again on what it wrote
		}
		return al, err
	}
}

func (m *Manager) allocateFixed(ctx context.Context, key ipam.PodKey, pod Pod, rec *Record) (ipam.Allocation, error) {
	n := m.node()
	d := DecideAdd(rec, pod, n)
	log := m.log.With(zap.Stringer("pod", key), zap.Stringer("action", d.Action), zap.String("reason", d.Reason))
	switch d.Action {
	case Allocate:
		// Never an ENI's primary address: the cloud cannot unassign it, so it could not follow
		// the pod to another node.
		al, err := m.Pool.AllocateMovable(ctx, key)
		if err != nil {
			return al, err
		}
		_, err = m.o.Records.Create(ctx, Record{Namespace: key.Namespace, Name: key.Name, IP: al.IP, VSwitchID: al.ENI.VSwitchID,
			ZoneID: n.Zone, Node: n.Name, ENIID: al.ENI.ID, PodUID: pod.UID, Phase: PhaseInUse, StatefulSet: pod.StatefulSet})
		if err != nil {
			if rerr := m.Pool.Release(context.WithoutCancel(ctx), key); rerr != nil {
				log.Warn("release after a failed FixedIP create failed; GC releases it", zap.Error(rerr))
			}
			if errors.Is(err, ErrConflict) {
				return ipam.Allocation{}, err
			}
			return ipam.Allocation{}, fmt.Errorf("%w: record FixedIP %s/%s: %v", ErrTryAgain, key.Namespace, key.Name, err)
		}
		m.ops.WithLabelValues("allocated").Inc()
		log.Info("fixed address recorded", zap.Stringer("ip", al.IP), zap.String("eni", al.ENI.ID))
		return al, nil
	case Refuse:
		m.ops.WithLabelValues("refused").Inc()
		m.o.Events.PodEvent(key.Namespace, key.Name, true, "TernFixedIPWrongZone", d.Reason)
		log.Warn("fixed address refused")
		return ipam.Allocation{}, fmt.Errorf("%w: %s", ErrWrongZone, d.Reason)
	case Wait:
		m.ops.WithLabelValues("waited").Inc()
		m.o.Events.PodEvent(key.Namespace, key.Name, true, "TernFixedIPWaiting", d.Reason)
		log.Info("fixed address not free yet")
		return ipam.Allocation{}, fmt.Errorf("%w: %s", ErrTryAgain, d.Reason)
	case Claim:
		claimed := *rec
		claimed.Node, claimed.Phase, claimed.PodUID = n.Name, PhaseMoving, pod.UID
		claimed.PreviousNode, claimed.PreviousENI, claimed.ENIID = rec.Node, rec.ENIID, ""
		claimed.ReleaseAfter = time.Time{}
		if rec.Phase == PhaseMoving {
			// A move to another node that did not finish: the address is still where that
			// move took it from, or already on its target's ENI (then ENIID says which).
			claimed.PreviousNode, claimed.PreviousENI = rec.PreviousNode, rec.PreviousENI
		}
		up, err := m.o.Records.Update(ctx, claimed)
		if err != nil {
			if errors.Is(err, ErrConflict) {
				return ipam.Allocation{}, err
			}
			return ipam.Allocation{}, fmt.Errorf("%w: claim FixedIP %s/%s: %v", ErrTryAgain, key.Namespace, key.Name, err)
		}
		m.ops.WithLabelValues("claimed").Inc()
		log.Info("claimed a fixed address from another node", zap.Stringer("ip", rec.IP), zap.String("from", rec.Node), zap.String("eni", rec.ENIID))
		return m.takeHere(ctx, key, pod, up)
	default: // TakeHere
		return m.takeHere(ctx, key, pod, *rec)
	}
}

// takeHere puts the record's address on this node for key: off the previous node's ENI when
// it is moving, then by name on an ENI here (retrying while the cloud still reports it in
// use), and marks the record InUse.
func (m *Manager) takeHere(ctx context.Context, key ipam.PodKey, pod Pod, rec Record) (ipam.Allocation, error) {
	if rec.Phase == PhaseMoving && rec.PreviousENI != "" {
		// Idempotent: an address no longer there is success. The previous node forgets its
		// hold when it sees the record name this node.
		if err := m.o.Cloud.UnassignPrivateIPs(ctx, rec.PreviousENI, []netip.Addr{rec.IP}); err != nil {
			m.ops.WithLabelValues("failed").Inc()
			return ipam.Allocation{}, fmt.Errorf("%w: unassign %s from ENI %s of node %s: %v", ErrTryAgain, rec.IP, rec.PreviousENI, rec.PreviousNode, err)
		}
	}
	al, err := m.assignByName(ctx, key, rec)
	if err != nil {
		return al, err
	}
	rec.Phase, rec.ENIID, rec.PodUID, rec.ReleaseAfter = PhaseInUse, al.ENI.ID, pod.UID, time.Time{}
	rec.PreviousNode, rec.PreviousENI = "", ""
	if _, err := m.o.Records.Update(ctx, rec); err != nil {
		// The address is this pod's here, and the record still names this node: a retry of
		// the ADD (or the next) finds it held here and writes InUse again.
		if rerr := m.holdOrForget(context.WithoutCancel(ctx), key, al.IP); rerr != nil {
			m.log.Warn("hold after a failed FixedIP update failed", zap.Stringer("pod", key), zap.Error(rerr))
		}
		if errors.Is(err, ErrConflict) {
			return ipam.Allocation{}, err
		}
		return ipam.Allocation{}, fmt.Errorf("%w: mark FixedIP %s/%s in use: %v", ErrTryAgain, key.Namespace, key.Name, err)
	}
	m.ops.WithLabelValues("kept").Inc()
	m.log.Info("fixed address given", zap.Stringer("pod", key), zap.Stringer("ip", al.IP), zap.String("eni", al.ENI.ID))
	return al, nil
}

// assignByName takes rec's address for key in the pool, retrying with backoff while the
// cloud still has it elsewhere (an unassign settling; the listing lags too).
func (m *Manager) assignByName(ctx context.Context, key ipam.PodKey, rec Record) (ipam.Allocation, error) {
	deadline := time.Now().Add(m.o.AssignWait)
	delay := 100 * time.Millisecond
	for {
		al, err := m.Pool.AllocateAddress(ctx, key, rec.IP, rec.VSwitchID)
		switch {
		case err == nil:
			return al, nil
		case errors.Is(err, ipam.ErrAddressHeld):
			m.ops.WithLabelValues("conflict").Inc()
			msg := fmt.Sprintf("fixed address %s of this pod is used by another pod on node %s; the pod gets no address until that pod is gone: %v", rec.IP, m.o.Node, err)
			m.o.Events.PodEvent(key.Namespace, key.Name, true, "TernFixedIPConflict", msg)
			return ipam.Allocation{}, fmt.Errorf("%w: %s", ErrTryAgain, msg)
		case errors.Is(err, ipam.ErrAddressInUse) && time.Now().Before(deadline):
			m.log.Debug("fixed address still in use in the cloud; retrying", zap.Stringer("pod", key), zap.Stringer("ip", rec.IP), zap.Duration("in", delay))
		case errors.Is(err, ipam.ErrAddressInUse):
			m.ops.WithLabelValues("conflict").Inc()
			msg := fmt.Sprintf("the cloud still reports fixed address %s in use after %s (another ENI holds it: is another pod or instance using it?): %v", rec.IP, m.o.AssignWait, err)
			m.o.Events.PodEvent(key.Namespace, key.Name, true, "TernFixedIPConflict", msg)
			return ipam.Allocation{}, fmt.Errorf("%w: %s", ErrTryAgain, msg)
		default:
			m.ops.WithLabelValues("failed").Inc()
			m.o.Events.PodEvent(key.Namespace, key.Name, true, "TernFixedIPFailed", fmt.Sprintf("fixed address %s: %v", rec.IP, err))
			return ipam.Allocation{}, err
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ipam.Allocation{}, fmt.Errorf("%w: fixed address %s still in use: %v", ErrTryAgain, rec.IP, ctx.Err())
		case <-t.C:
		}
		delay = min(2*delay, 2*time.Second)
	}
}

// Release keeps a fixed pod's address on hold (the record Held until the hold time passes);
// any other sandbox's address goes back to the pool.
func (m *Manager) Release(ctx context.Context, key ipam.PodKey) error {
	al, ok := m.Pool.Allocations()[key]
	if !ok || key.IsHold() {
		return m.Pool.Release(ctx, key)
	}
	// A pod still in the cache without the annotation is not fixed: no apiserver call.
	now, cancel := context.WithCancel(ctx)
	cancel()
	if pod, ok := m.o.Pods.Pod(now, key.Namespace, key.Name); ok && !pod.Fixed {
		return m.Pool.Release(ctx, key)
	}
	rec, err := m.o.Records.Get(ctx, key.Namespace, key.Name)
	if err != nil {
		// Whether the address is fixed cannot be known now: keep it, the hold pass decides.
		m.log.Warn("FixedIP record unreadable at release: holding the address", zap.Stringer("pod", key), zap.Error(err))
		_, _, herr := m.Pool.Hold(key)
		return herr
	}
	if rec == nil || rec.IP != al.IP {
		return m.Pool.Release(ctx, key)
	}
	return m.holdOrForget(ctx, key, al.IP)
}

// holdOrForget moves key's fixed address to the pod's hold, and marks the record Held (this
// node's) or forgets the address (another node's by now).
func (m *Manager) holdOrForget(ctx context.Context, key ipam.PodKey, ip netip.Addr) error {
	if _, _, err := m.Pool.Hold(key); err != nil {
		return err
	}
	for attempt := 0; attempt < 5; attempt++ {
		rec, err := m.o.Records.Get(ctx, key.Namespace, key.Name)
		if err != nil {
			return nil // the hold pass settles it
		}
		if rec == nil || rec.IP != ip {
			return nil // the hold pass drops it
		}
		if rec.Node != m.o.Node {
			m.ops.WithLabelValues("forgotten").Inc()
			return m.Pool.ForgetAddress(ip)
		}
		if rec.Phase == PhaseHeld {
			return nil
		}
		rec.Phase, rec.ReleaseAfter = PhaseHeld, m.o.Now().Add(m.o.HoldTime)
		if _, err := m.o.Records.Update(ctx, *rec); errors.Is(err, ErrConflict) {
			continue
		} else if err != nil {
			m.log.Warn("cannot mark FixedIP held; the address stays held here", zap.Stringer("pod", key), zap.Error(err))
			return nil
		}
		m.ops.WithLabelValues("held").Inc()
		m.log.Info("fixed address held for its pod", zap.Stringer("pod", key), zap.Stringer("ip", ip),
			zap.Time("releaseAfter", rec.ReleaseAfter))
		return nil
	}
	return nil
}

// GC keeps the fixed addresses of pods that are gone (on hold, as Release does) and lets the
// pool release every other address of a gone pod.
func (m *Manager) GC(ctx context.Context, livePods func() map[string]bool) (ipam.GCResult, error) {
	live := livePods()
	if live == nil {
		return ipam.GCResult{}, errors.New("fixed IP GC: live pod set is nil")
	}
	for k := range m.Pool.Allocations() {
		if k.IsHold() || live[k.Namespace+"/"+k.Name] {
			continue
		}
		al := m.Pool.Allocations()[k]
		rec, err := m.o.Records.Get(ctx, k.Namespace, k.Name)
		if err != nil || (rec != nil && rec.IP == al.IP) {
			if err := m.holdOrForget(ctx, k, al.IP); err != nil {
				m.log.Warn("fixed IP GC: hold failed", zap.Stringer("pod", k), zap.Error(err))
			}
		}
	}
	keep := map[string]bool{}
	for k, v := range live {
		keep[k] = v
	}
	for k := range m.Pool.Allocations() {
		if k.IsHold() {
			keep[k.Namespace+"/"+k.Name] = true
		}
	}
	return m.Pool.GC(ctx, func() map[string]bool { return keep })
}

// Sweep is the hold pass: every hold of this node is kept, released (hold time passed, or
// the StatefulSet no longer has the ordinal), forgotten (another node took the address) or
// dropped (no record names it).
func (m *Manager) Sweep(ctx context.Context) {
	n := m.node()
	for k, al := range m.Pool.Allocations() {
		if !k.IsHold() {
			continue
		}
		rec, err := m.o.Records.Get(ctx, k.Namespace, k.Name)
		if err != nil {
			m.log.Warn("hold pass: FixedIP unreadable", zap.Stringer("pod", k), zap.Error(err))
			continue
		}
		set, ord := SetState{Exists: true, Replicas: 1 << 30}, -1
		if rec != nil && rec.StatefulSet != "" {
			if set, err = m.o.Pods.StatefulSet(k.Namespace, rec.StatefulSet); err != nil {
				m.log.Debug("hold pass: StatefulSet not known yet", zap.Stringer("pod", k), zap.Error(err))
				continue
			}
			ord = Ordinal(k.Name, rec.StatefulSet)
		}
		act, why := DecideHold(al.IP, rec, ord, set, n, m.o.Now())
		log := m.log.With(zap.Stringer("pod", k), zap.Stringer("ip", al.IP), zap.Stringer("action", act), zap.String("reason", why))
		switch act {
		case Release:
			// The record goes first: a node claiming it meanwhile wins (our delete is
			// conditional), and then the address must not become idle here.
			if err := m.o.Records.Delete(ctx, *rec); err != nil {
				log.Info("fixed address not released: the record changed", zap.Error(err))
				continue
			}
			if err := m.Pool.Release(ctx, k); err != nil {
				log.Warn("release of a fixed address failed; GC retries", zap.Error(err))
				continue
			}
			m.ops.WithLabelValues("released").Inc()
			m.o.Events.PodEvent(k.Namespace, k.Name, false, "TernFixedIPReleased", fmt.Sprintf("fixed address %s released: %s", al.IP, why))
			log.Info("fixed address released")
		case Forget:
			if err := m.Pool.ForgetAddress(al.IP); err != nil {
				log.Warn("forget failed", zap.Error(err))
				continue
			}
			m.ops.WithLabelValues("forgotten").Inc()
			log.Info("fixed address moved to another node")
		case Drop:
			if err := m.Pool.Release(ctx, k); err != nil {
				log.Warn("drop of a hold failed", zap.Error(err))
				continue
			}
			m.ops.WithLabelValues("dropped").Inc()
			log.Info("hold dropped")
		}
	}
}
