package bandwidth

import (
	"net/netip"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Endpoint is a local pod as the manager needs it: its host veth and address.
type Endpoint struct {
	IfIndex int
	Addr    netip.Addr
}

// Options wire a Manager to the agent.
type Options struct {
	// Mode is the node's (Agent.BandwidthMode); empty means the policer.
	Mode Mode
	// Endpoints lists the pods the node serves (the endpoint registry).
	Endpoints func() []Endpoint
	// PodAddrs are the addresses the node gave its pods (the IPAM allocations), by
	// namespace/name. It is asked at every sync, because a pod's Kubernetes status gets its
	// IP only after the CNI returned, while its limits must be in place before its first
	// packet.
	PodAddrs func() map[string]netip.Addr
	Logger   *zap.Logger
}

type pod struct {
	addr   netip.Addr // from the pod's status; PodAddrs wins when it knows the pod
	limits Limits
}

// Manager joins what pods ask for (their annotations, from the Kubernetes watch) with the
// endpoints the node serves, and has the Reconciler write the result. Until the first full
// list of pods arrived (MarkSynced) it changes nothing, so an agent restart keeps the limits
// its predecessor left in force.
type Manager struct {
	rec  *Reconciler
	opts Options
	m    *metrics

	mu     sync.Mutex
	pods   map[string]pod // namespace/name → limits
	synced bool
}

// NewManager builds a manager over the pinned map.
func NewManager(maps Maps, opts Options) (*Manager, error) {
	rec, err := NewReconciler(maps, opts.Mode)
	if err != nil {
		return nil, err
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.Endpoints == nil {
		opts.Endpoints = func() []Endpoint { return nil }
	}
	if opts.PodAddrs == nil {
		opts.PodAddrs = func() map[string]netip.Addr { return nil }
	}
	return &Manager{rec: rec, opts: opts, m: newMetrics(rec), pods: map[string]pod{}}, nil
}

// Collectors are the manager's metrics.
func (m *Manager) Collectors() []prometheus.Collector { return m.m.collectors() }

// InvalidAnnotation counts a pod annotation the manager could not use (the caller records
// the Event on the pod).
func (m *Manager) InvalidAnnotation() { m.m.invalid.Inc() }

// SetPod records pod key's limits and its address from its status (invalid when not known
// yet), and applies them. Zero limits forget the pod.
func (m *Manager) SetPod(key string, addr netip.Addr, l Limits) {
	m.mu.Lock()
	if l.IsZero() {
		delete(m.pods, key)
	} else {
		m.pods[key] = pod{addr: addr, limits: l}
	}
	m.mu.Unlock()
	m.Sync()
}

// DeletePod forgets pod key.
func (m *Manager) DeletePod(key string) { m.SetPod(key, netip.Addr{}, Limits{}) }

// MarkSynced says every pod of the node has been seen once; from now on the map holds
// exactly what the pods ask for.
func (m *Manager) MarkSynced() {
	m.mu.Lock()
	m.synced = true
	m.mu.Unlock()
	m.Sync()
}

// Sync writes the limits of every endpoint whose pod has any. The agent calls it when an
// endpoint is attached (before its programs run) and the watch when a pod changes.
func (m *Manager) Sync() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.synced {
		return
	}
	byAddr := make(map[netip.Addr]Limits, len(m.pods))
	allocated := m.opts.PodAddrs()
	for key, p := range m.pods {
		addr := p.addr
		if a, ok := allocated[key]; ok {
			addr = a
		}
		if addr.IsValid() {
			byAddr[addr] = p.limits
		}
	}
	want := map[int]Limits{}
	for _, e := range m.opts.Endpoints() {
		if l, ok := byAddr[e.Addr]; ok {
			want[e.IfIndex] = l
		}
	}
	if err := m.rec.Apply(want); err != nil {
		m.m.errors.Inc()
		m.opts.Logger.Error("could not apply pod bandwidth limits (retried on the next pod or endpoint change)", zap.Error(err))
	}
}

// Forget drops the limits of the pod on ifindex at once: its veth is being detached.
func (m *Manager) Forget(ifindex int) {
	if err := m.rec.Delete(ifindex); err != nil {
		m.m.errors.Inc()
		m.opts.Logger.Error("could not remove bandwidth limits of a detached pod", zap.Int("ifindex", ifindex), zap.Error(err))
	}
}
