package ipam

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/store"
	"github.com/tern-net/tern/ipam/trunk"
)

// ENI trunking as a kind (docs/trunking.md): a pod gets a member ENI of the node's trunk ENI,
// on a VLAN of its own. ipam/trunk.Manager talks to the cloud (trunk ENI, member create,
// attach, release, GC, all idempotent by ClientToken and tags); this file adds what the node
// needs beside it: one record per sandbox in the store (kind/member), so the agent answers
// lookups and DELs without a cloud call and knows after a restart which members were handed
// to pods.

// KindMember is a member ENI of the node's trunk ENI (eni_conf enable_eni_trunking).
const KindMember Kind = "member"

// ResourceMemberENI is the Node's extended resource of member ENIs (Terway's name).
const ResourceMemberENI = trunk.ResourceMemberENI

func memberENISpec() KindSpec {
	return KindSpec{
		Kind:    KindMember,
		Enabled: func(n NodeInfo) bool { return n.Config.EnableENITrunking },
		New:     func(d KindDeps) (Resource, error) { return NewMemberENIs(d) },
	}
}

// States of a member record; each is written before the cloud work it names.
const (
	memAttaching = "attaching" // trunk.Manager.Allocate under way (create + attach)
	memReady     = "ready"     // attached; the pod was told
	memReleasing = "releasing" // detach + delete under way
)

// memberStaleAfter: an attaching record no call works on, older than this, belongs to an ADD
// that was killed and not retried (the runtime retries within seconds); GC releases it.
const memberStaleAfter = 2 * time.Minute

type memRecord struct {
	Namespace   string `json:"namespace"`
	Name        string `json:"name"`
	ContainerID string `json:"containerID"`
	State       string `json:"state"`
	// CloudKey names the member in the cloud (its tern.io/pod tag and ClientToken): the
	// sandbox's key and a nonce of the record, so a sandbox whose earlier member was removed
	// can get a new one.
	CloudKey string     `json:"cloudKey"`
	ENIID    string     `json:"eniID,omitempty"`
	IP       netip.Addr `json:"ip,omitzero"`
	VLAN     int        `json:"vlan,omitempty"`
	// VSwitchID and SecurityGroups are the placement the pod asked for (pod-networks; empty:
	// the trunk's vSwitch and eni_conf's groups), written before the create so a retry asks
	// the cloud the same (its ClientToken is this record's).
	VSwitchID      string    `json:"vSwitchID,omitempty"`
	SecurityGroups []string  `json:"securityGroups,omitempty"`
	Updated        time.Time `json:"updated"`
}

// cloudKey is the member's tern.io/pod tag (records written before the nonce: the sandbox key).
func (r *memRecord) cloudKey() string {
	if r.CloudKey == "" {
		return r.key().key()
	}
	return r.CloudKey
}

func (r *memRecord) key() PodKey {
	return PodKey{Namespace: r.Namespace, Name: r.Name, ContainerID: r.ContainerID}
}

// MemberENIs is the member-ENI kind.
type MemberENIs struct {
	d     KindDeps
	cloud aliyun.TrunkCloud
	st    *store.Store
	log   *zap.Logger
	gauge *prometheus.GaugeVec

	mu    sync.Mutex
	mgr   *trunk.Manager
	vsw   aliyun.VSwitch // the trunk's vSwitch, and its members' unless a pod names its own
	zone  string         // the node's zone: a pod's vSwitch must be in it
	cfg   eniconfig.Config
	recs  map[string]*memRecord
	busy  map[string]bool
	quota int
}

var _ Resource = (*MemberENIs)(nil)

// NewMemberENIs builds the kind; nothing touches the cloud before Start. The cloud must
// support trunking calls (aliyun.TrunkCloud).
func NewMemberENIs(d KindDeps) (*MemberENIs, error) {
	tc, ok := d.Cloud.(aliyun.TrunkCloud)
	if d.Cloud == nil || !ok || d.Store == nil || d.InstanceID == "" {
		return nil, errors.New("member ENIs need a cloud client with the trunking calls, a store and the instance ID")
	}
	if d.Logger == nil {
		d.Logger = zap.NewNop()
	}
	if d.Now == nil {
		d.Now = time.Now
	}
	if d.ClusterID == "" {
		d.ClusterID = "default"
	}
	return &MemberENIs{
		d: d, cloud: tc, st: d.Store, cfg: d.Config,
		log:   d.Logger.Named("member").With(zap.String("instance", d.InstanceID)),
		gauge: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "tern_ipam_member_enis", Help: "Trunk member ENIs this node holds for pods, by state (ready, or an operation under way)."}, []string{"state"}),
		recs:  map[string]*memRecord{}, busy: map[string]bool{},
	}, nil
}

// Kind is KindMember.
func (m *MemberENIs) Kind() Kind { return KindMember }

// Start picks the vSwitch, makes sure the node's trunk ENI is attached (trunk.Manager.Start:
// an instance type without trunking is refused, naming the setting to change) and reads the
// store. Records an ADD left attaching stay: the runtime retries the ADD (the same ClientToken
// returns the same member), or GC releases them.
func (m *MemberENIs) Start(ctx context.Context) error {
	inst, err := m.cloud.Instance(ctx, m.d.InstanceID)
	if err != nil {
		return fmt.Errorf("trunking: describe instance %s: %w", m.d.InstanceID, err)
	}
	m.mu.Lock()
	cfg := m.cfg
	m.mu.Unlock()
	vsw, err := pickZoneVSwitch(ctx, m.cloud, inst.ZoneID, cfg.VSwitches[inst.ZoneID], false)
	if err != nil {
		return fmt.Errorf("trunking: %w", err)
	}
	mgr := trunk.New(m.cloud, trunk.Options{InstanceID: m.d.InstanceID, NodeName: m.d.NodeName, ClusterID: m.d.ClusterID,
		VSwitchID: vsw.ID, SecurityGroups: cfg.SecurityGroups, Tags: cfg.ENITags}, m.d.Logger)
	if err := mgr.Start(ctx); err != nil {
		return err
	}
	raw, err := m.st.LoadKind(string(KindMember))
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.mgr, m.vsw, m.zone, m.quota = mgr, vsw, inst.ZoneID, mgr.Quota()
	for k, v := range raw {
		var r memRecord
		if err := json.Unmarshal(v, &r); err != nil {
			return fmt.Errorf("decode member ENI record %s: %w (the state file is corrupt; move it aside to rebuild)", k, err)
		}
		m.recs[k] = &r
	}
	var stale []memRecord
	for _, r := range m.recs {
		if r.State != memReady {
			stale = append(stale, *r)
		}
	}
	m.publishLocked()
	m.mu.Unlock()
	// The process that worked on these is gone: an ADD it was serving failed for the runtime,
	// which retries with a new record (and nonce). Release them now rather than hold their
	// quota until a GC.
	for _, r := range stale {
		if err := m.releaseRecord(ctx, r); err != nil {
			m.log.Warn("member ENI of an interrupted operation not released yet; GC retries", zap.String("pod", r.key().key()), zap.Error(err))
		}
	}
	m.mu.Lock()
	return nil
}

// Stop has nothing to stop: the kind has no loop (GC finishes interrupted work).
func (m *MemberENIs) Stop() {}

// Trunk is the node's trunk ENI (zero before Start).
func (m *MemberENIs) Trunk() aliyun.ENI {
	m.mu.Lock()
	mgr := m.mgr
	m.mu.Unlock()
	if mgr == nil {
		return aliyun.ENI{}
	}
	return mgr.Trunk()
}

func (m *MemberENIs) manager() *trunk.Manager {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mgr
}

func (m *MemberENIs) save(r *memRecord) error {
	r.Updated = m.d.Now()
	k := r.key().key()
	if err := m.st.PutKindRecord(string(KindMember), k, r); err != nil {
		return fmt.Errorf("record member ENI of %s (%s): %w", k, r.State, err)
	}
	m.mu.Lock()
	c := *r
	m.recs[k] = &c
	m.publishLocked()
	m.mu.Unlock()
	return nil
}

func (m *MemberENIs) forget(key PodKey) error {
	k := key.key()
	if err := m.st.DeleteKindRecord(string(KindMember), k); err != nil {
		return fmt.Errorf("drop member ENI record of %s: %w", k, err)
	}
	m.mu.Lock()
	delete(m.recs, k)
	m.publishLocked()
	m.mu.Unlock()
	return nil
}

func (m *MemberENIs) publishLocked() {
	counts := map[string]int{memReady: 0, memAttaching: 0, memReleasing: 0}
	for _, r := range m.recs {
		counts[r.State]++
	}
	for s, n := range counts {
		m.gauge.WithLabelValues(s).Set(float64(n))
	}
}

// ENIsHeld is 0: members take no device slot, and the trunk ENI (which takes one) is not
// tagged as the pool's, so the ENIIP pool's listing already counts it as a foreign ENI.
func (m *MemberENIs) ENIsHeld() int { return 0 }

// ListedENIs is the trunk ENI's device slot once it is attached: the ENIIP pool counts it
// from its listing, the exclusive kind through Node.ENIsHeldExcept (without it, aliyun/eni
// offered one ENI more than the instance could attach).
func (m *MemberENIs) ListedENIs() int {
	if m.Trunk().ID != "" {
		return 1
	}
	return 0
}

// Capacity: the instance type's member quota (EniTotalQuantity − EniQuantity).
func (m *MemberENIs) Capacity() KindCapacity {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := KindCapacity{Kind: KindMember, ExtendedResource: ResourceMemberENI, Capacity: m.quota}
	for _, r := range m.recs {
		if r.State == memReady {
			c.InUse++
		}
	}
	return c
}

// UpdateConfig keeps the new eni_conf; the vSwitch and default security groups of members
// follow it at the next start.
func (m *MemberENIs) UpdateConfig(cfg eniconfig.Config) {
	m.mu.Lock()
	m.cfg = cfg
	m.mu.Unlock()
}

// Collectors: tern_ipam_member_enis.
func (m *MemberENIs) Collectors() []prometheus.Collector { return []prometheus.Collector{m.gauge} }

// Allocations lists the pods holding a ready member.
func (m *MemberENIs) Allocations() map[PodKey]Allocation {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[PodKey]Allocation{}
	for _, r := range m.recs {
		if r.State == memReady {
			out[r.key()] = m.allocationLocked(r)
		}
	}
	return out
}

// allocationLocked: the pod's address is its member's primary; ENI is the trunk ENI, whose
// link carries the pod's traffic (tagged with VLAN), so the CNI wires the pod like an ENIIP pod
// of the trunk.
func (m *MemberENIs) allocationLocked(r *memRecord) Allocation {
	t := m.mgr.Trunk()
	return Allocation{IP: r.IP, Kind: KindMember, VLAN: r.VLAN, MemberENI: r.ENIID, ENI: ENIInfo{ID: t.ID, MAC: t.MAC,
		PrimaryIP: t.PrimaryIP, Gateway: aliyun.Gateway(m.vsw.CIDR), VSwitchID: m.vsw.ID, VSwitchCIDR: m.vsw.CIDR}}
}

// Allocate gives the pod a member ENI: the record (attaching) is written first, then
// trunk.Manager.Allocate creates and attaches it (the same ClientToken for the same sandbox,
// so a retry after a failure or a kill -9 gets the same ENI), then the record is ready.
func (m *MemberENIs) Allocate(ctx context.Context, req Request) (Allocation, error) {
	k := req.Key.key()
	m.mu.Lock()
	if m.mgr == nil {
		m.mu.Unlock()
		return Allocation{}, ErrNotStarted
	}
	if m.busy[k] {
		m.mu.Unlock()
		return Allocation{}, fmt.Errorf("%w: another call is working on the member ENI of %s", ErrPoolEmptyTryAgain, k)
	}
	r, ok := m.recs[k]
	if ok && r.State == memReady {
		defer m.mu.Unlock()
		return m.allocationLocked(r), nil
	}
	if ok && r.State == memReleasing {
		m.mu.Unlock()
		return Allocation{}, fmt.Errorf("%w: the member ENI of %s is being released", ErrPoolEmptyTryAgain, k)
	}
	// Every record holds, or may hold, a member (a releasing one until the cloud confirms),
	// and so does every allocation under way that has not written its record yet.
	inUse := len(m.recs)
	for b := range m.busy {
		if _, has := m.recs[b]; !has {
			inUse++
		}
	}
	if !ok && inUse >= m.quota {
		m.mu.Unlock()
		return Allocation{}, fmt.Errorf("%w (here: the member-ENI quota): %d of %d member ENIs in use (%s)", ErrNodeFull, inUse, m.quota, ResourceMemberENI)
	}
	m.busy[k] = true
	mgr, zone := m.mgr, m.zone
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.busy, k)
		m.mu.Unlock()
	}()

	rec := &memRecord{Namespace: req.Key.Namespace, Name: req.Key.Name, ContainerID: req.Key.ContainerID, State: memAttaching,
		CloudKey: k + "#" + strconv.FormatUint(rand.Uint64(), 36), SecurityGroups: req.SecurityGroups}
	if ok {
		// A retry in this process: the same member (ClientToken), asked for alike.
		rec.CloudKey, rec.VSwitchID, rec.SecurityGroups = r.CloudKey, r.VSwitchID, r.SecurityGroups
	} else if len(req.VSwitchIDs) > 0 {
		vsw, err := pickZoneVSwitch(ctx, m.cloud, zone, req.VSwitchIDs, true)
		if err != nil {
			return Allocation{}, fmt.Errorf("member ENI of %s (annotation %s): %w", k, AnnotationPodNetworks, err)
		}
		rec.VSwitchID = vsw.ID
	}
	if err := m.save(rec); err != nil {
		return Allocation{}, err
	}
	mem, err := mgr.Allocate(ctx, rec.CloudKey, trunk.MemberRequest{VSwitchID: rec.VSwitchID, SecurityGroups: rec.SecurityGroups})
	if err != nil {
		if ctx.Err() == nil && !errors.Is(err, aliyun.ErrTimeout) {
			// The manager deleted what it made, or made nothing: drop the record (a member it
			// could not delete no record names, so GC removes it).
			if ferr := m.forget(req.Key); ferr != nil {
				m.log.Warn("could not drop a failed member record; GC will", zap.Error(ferr))
			}
			if strings.Contains(err.Error(), "EniPerInstanceLimitExceeded") {
				return Allocation{}, fmt.Errorf("%w: %v", ErrNodeFull, err)
			}
		}
		return Allocation{}, err
	}
	rec.State, rec.ENIID, rec.IP, rec.VLAN = memReady, mem.ENIID, mem.IP, mem.VLAN
	if err := m.save(rec); err != nil {
		return Allocation{}, err
	}
	m.log.Info("member ENI ready", zap.String("pod", k), zap.String("eni", mem.ENIID), zap.Stringer("ip", mem.IP), zap.Int("vlan", mem.VLAN), zap.String("vSwitch", mem.VSwitch))
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.allocationLocked(rec), nil
}

// Release detaches and deletes the pod's member; the record goes when the cloud confirms. A
// failure keeps the record (releasing) for GC to finish, and the DEL succeeds: the ENI is no
// longer the pod's.
func (m *MemberENIs) Release(ctx context.Context, key PodKey) error {
	k := key.key()
	m.mu.Lock()
	r, ok := m.recs[k]
	if !ok || m.busy[k] || m.mgr == nil {
		m.mu.Unlock()
		return nil
	}
	c := *r
	m.mu.Unlock()
	if err := m.releaseRecord(ctx, c); err != nil {
		m.log.Warn("member ENI release failed; GC finishes it", zap.String("pod", k), zap.Error(err))
	}
	return nil
}

// releaseRecord marks r releasing, removes its member in the cloud and drops it; an error
// leaves it releasing.
func (m *MemberENIs) releaseRecord(ctx context.Context, r memRecord) error {
	k := r.key().key()
	m.mu.Lock()
	if m.busy[k] {
		m.mu.Unlock()
		return nil
	}
	m.busy[k] = true
	mgr := m.mgr
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.busy, k)
		m.mu.Unlock()
	}()
	r.State = memReleasing
	if err := m.save(&r); err != nil {
		return err
	}
	if err := mgr.Release(ctx, r.cloudKey()); err != nil {
		return err
	}
	return m.forget(r.key())
}

// ReleaseUnfinished releases the record an ADD of key left attaching (it failed or timed out,
// or the agent was killed during it) when the sandbox's DEL comes: the member it may have made
// goes, and so does the quota slot. An ADD still working on it is left alone.
func (m *MemberENIs) ReleaseUnfinished(ctx context.Context, key PodKey) error {
	m.mu.Lock()
	r, ok := m.recs[key.key()]
	unfinished := ok && r.State != memReady
	m.mu.Unlock()
	if !unfinished {
		return nil
	}
	return m.Release(ctx, key)
}

// GC releases the records of pods that are gone (and of ADDs killed and never retried), then
// lets trunk.Manager remove every member of this node that no record names.
func (m *MemberENIs) GC(ctx context.Context, livePods func() map[string]bool) (GCResult, error) {
	mgr := m.manager()
	if mgr == nil {
		return GCResult{}, ErrNotStarted
	}
	live := livePods()
	now := m.d.Now()
	var res GCResult
	var errs []error
	m.mu.Lock()
	// A pod with a ready sandbox has abandoned its other sandboxes: the runtime makes a new
	// one only after giving up on the old, so an attaching record beside a ready one is an ADD
	// that was killed and will not be retried.
	readySandbox := map[string]string{}
	for _, r := range m.recs {
		if r.State == memReady {
			readySandbox[r.Namespace+"/"+r.Name] = r.ContainerID
		}
	}
	var due []memRecord
	for k, r := range m.recs {
		if m.busy[k] {
			continue
		}
		pod := r.Namespace + "/" + r.Name
		gone := !live[pod]
		superseded := readySandbox[pod] != "" && readySandbox[pod] != r.ContainerID
		switch {
		case r.State == memReleasing,
			r.State == memAttaching && (gone || superseded || now.Sub(r.Updated) > memberStaleAfter),
			r.State == memReady && gone:
			due = append(due, *r)
		}
	}
	m.mu.Unlock()
	for _, r := range due {
		if r.State == memReady {
			res.ReleasedAllocations = append(res.ReleasedAllocations, r.key())
		}
		if err := m.releaseRecord(ctx, r); err != nil {
			errs = append(errs, err)
		}
	}
	n, err := mgr.GC(ctx, func(cloudKey string) bool {
		m.mu.Lock()
		defer m.mu.Unlock()
		for k, r := range m.recs {
			if r.cloudKey() == cloudKey || m.busy[k] && strings.HasPrefix(cloudKey, k+"#") {
				return true
			}
		}
		return false
	})
	if err != nil {
		errs = append(errs, err)
	}
	if n > 0 {
		m.log.Info("GC removed member ENIs no record names", zap.Int("count", n))
	}
	return res, errors.Join(errs...)
}

// TrunkENI is the node's trunk ENI ID and member quota when the member kind is on and started
// (what trunk.PublishNode puts on the Node).
func (n *Node) TrunkENI() (id string, quota int, ok bool) {
	m, isMember := n.resource(KindMember).(*MemberENIs)
	if !isMember {
		return "", 0, false
	}
	t := m.Trunk()
	return t.ID, m.Capacity().Capacity, t.ID != ""
}
