package ipam

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/store"
)

// Exclusive ENI mode: one whole ENI per pod (Terway's "exclusive ENI"), created and attached
// when the pod's sandbox is added, detached and deleted when it goes. Its primary address is the
// pod's address; the CNI moves the ENI's link into the pod's namespace.

const (
	// LabelExclusiveENI on a Node turns exclusive ENIs on (Terway's label, value
	// LabelExclusiveENIOnly).
	LabelExclusiveENI     = "k8s.aliyun.com/exclusive-mode-eni-type"
	LabelExclusiveENIOnly = "eniOnly"
	// ResourceENI is the Node's extended resource for exclusive ENIs (Terway's device plugin
	// name); a pod requesting it gets one.
	ResourceENI = "aliyun/eni"
	// TagPod and TagToken on an exclusive ENI name the pod it was made for and the create's
	// ClientToken, so a listing can be matched with the store after a crash.
	TagPod   = "tern.io/pod"
	TagToken = "tern.io/token"
)

func exclusiveENISpec() KindSpec {
	return KindSpec{
		Kind:    KindENI,
		Enabled: func(n NodeInfo) bool { return n.Labels[LabelExclusiveENI] == LabelExclusiveENIOnly },
		New:     func(d KindDeps) (Resource, error) { return NewExclusiveENIs(d) },
	}
}

// States of an exclusive ENI record. Each is written (fsynced) before the step it names.
const (
	exCreating  = "creating"  // CreateNetworkInterface under way with Token; ENIID may be empty
	exAttaching = "attaching" // created (ENIID known), AttachNetworkInterface under way
	exReady     = "ready"     // attached; the pod was told about it
	exReleasing = "releasing" // detach + delete under way
)

// exRecord is one pod's exclusive ENI in the store (bucket kind/eni, key namespace/name/container).
type exRecord struct {
	Namespace      string       `json:"namespace"`
	Name           string       `json:"name"`
	ContainerID    string       `json:"containerID"`
	State          string       `json:"state"`
	Token          string       `json:"token"`
	VSwitchID      string       `json:"vSwitchID"`
	SecurityGroups []string     `json:"securityGroups,omitempty"`
	ENIID          string       `json:"eniID,omitempty"`
	MAC            string       `json:"mac,omitempty"`
	IP             netip.Addr   `json:"ip,omitzero"`
	CIDR           netip.Prefix `json:"cidr,omitzero"`
	Updated        time.Time    `json:"updated"`
}

func (r *exRecord) key() PodKey {
	return PodKey{Namespace: r.Namespace, Name: r.Name, ContainerID: r.ContainerID}
}

// ExclusiveENIs is the exclusive ENI kind.
type ExclusiveENIs struct {
	d     KindDeps
	cloud aliyun.Cloud
	st    *store.Store
	log   *zap.Logger
	gauge *prometheus.GaugeVec

	limits   aliyun.Limits
	instance aliyun.Instance

	mu       sync.Mutex
	cfg      eniconfig.Config
	recs     map[string]*exRecord // by PodKey.key()
	busy     map[string]bool      // records an Allocate or Release is working on
	suspects map[string]time.Time // listed ENIs the store does not know → first seen

	stop chan struct{}
	done chan struct{}
}

var _ Resource = (*ExclusiveENIs)(nil)

// NewExclusiveENIs builds the kind; nothing touches the cloud before Start.
func NewExclusiveENIs(d KindDeps) (*ExclusiveENIs, error) {
	if d.Cloud == nil || d.Store == nil || d.InstanceID == "" {
		return nil, errors.New("exclusive ENIs need a cloud, a store and the instance ID")
	}
	if d.Logger == nil {
		d.Logger = zap.NewNop()
	}
	if d.ListingGrace <= 0 {
		d.ListingGrace = 10 * time.Second
	}
	if d.Now == nil {
		d.Now = time.Now
	}
	if d.ClusterID == "" {
		d.ClusterID = "default"
	}
	if d.OtherENIs == nil {
		d.OtherENIs = func() int { return 0 }
	}
	return &ExclusiveENIs{
		d: d, cloud: d.Cloud, st: d.Store, cfg: d.Config,
		log:   d.Logger.Named("exclusive").With(zap.String("instance", d.InstanceID)),
		gauge: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "tern_ipam_exclusive_enis", Help: "Exclusive ENIs this node holds for pods, by state (ready, or an operation under way)."}, []string{"state"}),
		recs:  map[string]*exRecord{}, busy: map[string]bool{}, suspects: map[string]time.Time{},
	}, nil
}

// Kind is KindENI.
func (x *ExclusiveENIs) Kind() Kind { return KindENI }

func (x *ExclusiveENIs) tags(key PodKey, token string) map[string]string {
	t := x.ownTags()
	x.mu.Lock()
	for k, v := range x.cfg.ENITags {
		t[k] = v
	}
	x.mu.Unlock()
	t[TagPod] = key.Namespace + "/" + key.Name
	t[TagToken] = token
	return t
}

// ownTags select this node's exclusive ENIs in a listing.
func (x *ExclusiveENIs) ownTags() map[string]string {
	return map[string]string{TagCreator: TagCreatorTern, TagCluster: x.d.ClusterID, TagNode: x.d.NodeName, TagKind: string(KindENI)}
}

// Start reads the store and undoes every ADD and finishes every DEL a crash interrupted: an
// ENI that was being created or attached was never handed to a pod, so it is deleted.
func (x *ExclusiveENIs) Start(ctx context.Context) error {
	inst, err := x.cloud.Instance(ctx, x.d.InstanceID)
	if err != nil {
		return fmt.Errorf("describe instance %s: %w", x.d.InstanceID, err)
	}
	lim, err := x.cloud.InstanceTypeLimits(ctx, inst.Type)
	if err != nil {
		return fmt.Errorf("limits of instance type %s: %w", inst.Type, err)
	}
	raw, err := x.st.LoadKind(string(KindENI))
	if err != nil {
		return err
	}
	x.mu.Lock()
	x.instance, x.limits = inst, lim
	for k, v := range raw {
		var r exRecord
		if err := json.Unmarshal(v, &r); err != nil {
			x.mu.Unlock()
			return fmt.Errorf("decode exclusive ENI record %s: %w (the state file is corrupt; move it aside to rebuild)", k, err)
		}
		x.recs[k] = &r
	}
	x.publishLocked()
	x.mu.Unlock()
	if err := x.finishInterrupted(ctx); err != nil {
		// Not fatal: the records stay and the maintenance loop and GC retry.
		x.log.Warn("interrupted exclusive ENI operations not finished yet; retrying in the background", zap.Error(err))
	}
	x.stop, x.done = make(chan struct{}), make(chan struct{})
	go x.loop()
	return nil
}

// Stop ends the maintenance loop.
func (x *ExclusiveENIs) Stop() {
	if x.stop == nil {
		return
	}
	close(x.stop)
	<-x.done
	x.stop = nil
}

func (x *ExclusiveENIs) loop() {
	defer close(x.done)
	rnd := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0x656e69))
	for {
		select {
		case <-x.stop:
			return
		case <-time.After(Jitter(30*time.Second, LoopJitter, rnd)):
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if err := x.finishInterrupted(ctx); err != nil {
			x.log.Warn("exclusive ENI operations still unfinished", zap.Error(err))
		}
		cancel()
	}
}

// finishInterrupted undoes creates/attaches and completes releases that no call is working on.
func (x *ExclusiveENIs) finishInterrupted(ctx context.Context) error {
	var errs []error
	for _, r := range x.takeIdle(func(r *exRecord) bool { return r.State != exReady }) {
		errs = append(errs, x.undo(ctx, r))
		x.untake(r)
	}
	return errors.Join(errs...)
}

// takeIdle marks matching records busy and returns copies.
func (x *ExclusiveENIs) takeIdle(match func(*exRecord) bool) []*exRecord {
	x.mu.Lock()
	defer x.mu.Unlock()
	var out []*exRecord
	for k, r := range x.recs {
		if !x.busy[k] && match(r) {
			x.busy[k] = true
			c := *r
			out = append(out, &c)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].key().key() < out[j].key().key() })
	return out
}

func (x *ExclusiveENIs) untake(r *exRecord) {
	x.mu.Lock()
	delete(x.busy, r.key().key())
	x.mu.Unlock()
}

// save persists r (fsynced) and mirrors it in memory.
func (x *ExclusiveENIs) save(r *exRecord) error {
	r.Updated = x.d.Now()
	k := r.key().key()
	if err := x.st.PutKindRecord(string(KindENI), k, r); err != nil {
		return fmt.Errorf("record exclusive ENI of %s: %w", k, err)
	}
	x.mu.Lock()
	c := *r
	x.recs[k] = &c
	x.publishLocked()
	x.mu.Unlock()
	return nil
}

func (x *ExclusiveENIs) forget(r *exRecord) error {
	k := r.key().key()
	if err := x.st.DeleteKindRecord(string(KindENI), k); err != nil {
		return fmt.Errorf("drop exclusive ENI record of %s: %w", k, err)
	}
	x.mu.Lock()
	delete(x.recs, k)
	x.publishLocked()
	x.mu.Unlock()
	return nil
}

func (x *ExclusiveENIs) publishLocked() {
	counts := map[string]int{exReady: 0, exCreating: 0, exAttaching: 0, exReleasing: 0}
	for _, r := range x.recs {
		counts[r.State]++
	}
	for s, n := range counts {
		x.gauge.WithLabelValues(s).Set(float64(n))
	}
}

// ENIsHeld counts every record: each holds (or may hold) one ENI of the instance's quota.
func (x *ExclusiveENIs) ENIsHeld() int {
	x.mu.Lock()
	defer x.mu.Unlock()
	return len(x.recs)
}

// Capacity: EniQuantity − 1 (the primary) − the ENIs the other kinds hold.
func (x *ExclusiveENIs) Capacity() KindCapacity {
	others := x.d.OtherENIs()
	x.mu.Lock()
	defer x.mu.Unlock()
	c := KindCapacity{Kind: KindENI, ExtendedResource: ResourceENI, Capacity: max(x.limits.ENIs-1-others, 0)}
	for _, r := range x.recs {
		if r.State == exReady {
			c.InUse++
		}
	}
	return c
}

// UpdateConfig applies a reloaded eni_conf (vSwitches, security groups, tags) to new ENIs.
func (x *ExclusiveENIs) UpdateConfig(cfg eniconfig.Config) {
	x.mu.Lock()
	x.cfg = cfg
	x.mu.Unlock()
}

// Collectors are the kind's metrics.
func (x *ExclusiveENIs) Collectors() []prometheus.Collector { return []prometheus.Collector{x.gauge} }

// Allocations lists the pods holding a ready ENI.
func (x *ExclusiveENIs) Allocations() map[PodKey]Allocation {
	x.mu.Lock()
	defer x.mu.Unlock()
	out := map[PodKey]Allocation{}
	for _, r := range x.recs {
		if r.State == exReady {
			out[r.key()] = x.allocationLocked(r)
		}
	}
	return out
}

func (x *ExclusiveENIs) allocationLocked(r *exRecord) Allocation {
	var via []netip.Prefix
	if x.cfg.ServiceCIDR.IsValid() {
		via = append(via, x.cfg.ServiceCIDR)
	}
	if x.instance.PrimaryIP.IsValid() {
		via = append(via, netip.PrefixFrom(x.instance.PrimaryIP, 32))
	}
	return Allocation{IP: r.IP, Kind: KindENI, ViaVeth: via, ENI: ENIInfo{ID: r.ENIID, MAC: r.MAC, PrimaryIP: r.IP,
		Gateway: aliyun.Gateway(r.CIDR), VSwitchID: r.VSwitchID, VSwitchCIDR: r.CIDR}}
}

// Allocate creates and attaches an ENI for the pod. The record goes through creating →
// attaching → ready, each state fsynced before its cloud call; on a failure the ENI is
// detached and deleted at once (or, if the cloud cannot be reached, by the maintenance loop,
// GC or the next start).
func (x *ExclusiveENIs) Allocate(ctx context.Context, req Request) (Allocation, error) {
	k := req.Key.key()
	x.mu.Lock()
	if x.limits.ENIs == 0 {
		x.mu.Unlock()
		return Allocation{}, ErrNotStarted
	}
	if r, ok := x.recs[k]; ok {
		defer x.mu.Unlock()
		if r.State == exReady {
			return x.allocationLocked(r), nil
		}
		return Allocation{}, fmt.Errorf("%w: the exclusive ENI of %s is still being set up or torn down", ErrPoolEmptyTryAgain, k)
	}
	held := len(x.recs) + x.d.OtherENIs()
	if held >= x.limits.ENIs-1 {
		x.mu.Unlock()
		return Allocation{}, fmt.Errorf("%w: %d of the %d secondary ENIs instance type %s allows are in use (exclusive and shared); schedule the pod elsewhere",
			ErrNodeFull, held, x.limits.ENIs-1, x.limits.InstanceType)
	}
	cfg := x.cfg
	r := &exRecord{Namespace: req.Key.Namespace, Name: req.Key.Name, ContainerID: req.Key.ContainerID,
		State: exCreating, Token: newToken()}
	// Reserve the quota slot before any call, so concurrent ADDs cannot overshoot it.
	x.recs[k] = r
	x.busy[k] = true
	x.mu.Unlock()
	defer func() {
		x.mu.Lock()
		delete(x.busy, k)
		if cur, ok := x.recs[k]; ok && cur == r {
			delete(x.recs, k) // never saved
		}
		x.mu.Unlock()
	}()

	vsw, err := x.pickVSwitch(ctx, cfg, req.VSwitchIDs)
	if err != nil {
		return Allocation{}, err
	}
	sgs := req.SecurityGroups
	if len(sgs) == 0 {
		sgs = cfg.SecurityGroups
	}
	if len(sgs) == 0 || len(sgs) > 10 {
		return Allocation{}, fmt.Errorf("pod %s: %d security groups; an ENI takes 1 to 10 (eni_conf security_groups or the pod's k8s.aliyun.com/pod-networks)", k, len(sgs))
	}
	r.VSwitchID, r.CIDR, r.SecurityGroups = vsw.ID, vsw.CIDR, slices.Clone(sgs)
	if err := x.save(r); err != nil {
		return Allocation{}, err
	}
	eni, err := x.cloud.CreateENI(ctx, aliyun.CreateENIRequest{VSwitchID: vsw.ID, SecurityGroups: sgs,
		Tags: x.tags(req.Key, r.Token), Name: "tern-" + req.Key.Namespace + "-" + req.Key.Name,
		Description: "tern exclusive ENI of pod " + req.Key.Namespace + "/" + req.Key.Name, Token: r.Token})
	if err != nil {
		err = fmt.Errorf("create ENI in vSwitch %s for pod %s: %w", vsw.ID, k, err)
		if refused(err) {
			if ferr := x.forget(r); ferr != nil {
				x.log.Warn("could not drop the record of a refused create", zap.Error(ferr))
			}
			return Allocation{}, err
		}
		return Allocation{}, x.fail(r, err)
	}
	r.State, r.ENIID, r.MAC, r.IP = exAttaching, eni.ID, eni.MAC, eni.PrimaryIP
	if err := x.save(r); err != nil {
		return Allocation{}, x.fail(r, err)
	}
	if _, err := x.cloud.AttachENI(ctx, eni.ID, x.d.InstanceID); err != nil {
		if errors.Is(err, aliyun.ErrQuota) {
			err = fmt.Errorf("%w: %w", ErrNodeFull, err)
		}
		return Allocation{}, x.fail(r, fmt.Errorf("attach ENI %s for pod %s: %w", eni.ID, k, err))
	}
	r.State = exReady
	if err := x.save(r); err != nil {
		return Allocation{}, x.fail(r, err)
	}
	x.log.Info("exclusive ENI ready", zap.String("pod", k), zap.String("eni", r.ENIID), zap.Stringer("ip", r.IP))
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.allocationLocked(r), nil
}

// fail undoes a failed ADD (a context of its own: the caller's may be what ended) and returns
// cause; whatever the undo cannot finish stays recorded for the maintenance loop.
func (x *ExclusiveENIs) fail(r *exRecord, cause error) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := x.undo(ctx, r); err != nil {
		x.log.Warn("could not remove the ENI of a failed ADD yet; the maintenance loop retries", zap.String("pod", r.key().key()), zap.Error(err))
	}
	return cause
}

// undo removes the record's ENI, whatever state it reached, then the record. A create whose
// outcome is unknown is replayed with its token first: the cloud answers with the ENI it made,
// or refuses, which means it made none.
func (x *ExclusiveENIs) undo(ctx context.Context, r *exRecord) error {
	if r.State == exReady {
		r.State = exReleasing
		if err := x.save(r); err != nil {
			return err
		}
	}
	if r.ENIID == "" {
		eni, err := x.cloud.CreateENI(ctx, aliyun.CreateENIRequest{VSwitchID: r.VSwitchID, SecurityGroups: r.SecurityGroups,
			Tags: x.tags(r.key(), r.Token), Token: r.Token})
		switch {
		case err == nil:
			r.ENIID = eni.ID
			if err := x.save(r); err != nil {
				return err
			}
		case refused(err):
			x.log.Info("the interrupted create made no ENI", zap.String("pod", r.key().key()), zap.Error(err))
			return x.forget(r)
		default:
			return fmt.Errorf("learn the outcome of the interrupted create for %s: %w", r.key(), err)
		}
	}
	if err := x.destroy(ctx, r.ENIID); err != nil {
		return err
	}
	return x.forget(r)
}

// destroy detaches (if attached) and deletes an ENI; gone already is fine.
func (x *ExclusiveENIs) destroy(ctx context.Context, id string) error {
	if err := x.cloud.DetachENI(ctx, id, x.d.InstanceID); err != nil && !errors.Is(err, aliyun.ErrNotFound) {
		return fmt.Errorf("detach exclusive ENI %s: %w", id, err)
	}
	if err := x.cloud.DeleteENI(ctx, id); err != nil && !errors.Is(err, aliyun.ErrNotFound) {
		return fmt.Errorf("delete exclusive ENI %s: %w", id, err)
	}
	return nil
}

// refused says the cloud answered the call and did not carry it out (a 4xx answer): retrying
// the same call cannot have taken effect before.
func refused(err error) bool {
	var ae *aliyun.APIError
	return errors.As(err, &ae) && ae.HTTPStatus >= 400 && ae.HTTPStatus < 500
}

// pickVSwitch takes the pod's vSwitches (annotation) or eni_conf's for the node's zone, and
// returns the one with the most free addresses.
func (x *ExclusiveENIs) pickVSwitch(ctx context.Context, cfg eniconfig.Config, fromPod []string) (aliyun.VSwitch, error) {
	zone := x.instance.ZoneID
	if len(fromPod) > 0 {
		return pickZoneVSwitch(ctx, x.cloud, zone, fromPod, true)
	}
	return pickZoneVSwitch(ctx, x.cloud, zone, cfg.VSwitches[zone], false)
}

// Release detaches and deletes the pod's ENI. The record is marked releasing first, so a
// crash half way is finished at the next start; a cloud failure is finished by the maintenance
// loop or GC, and the pod's DEL succeeds (the ENI is no longer the pod's).
func (x *ExclusiveENIs) Release(ctx context.Context, key PodKey) error {
	k := key.key()
	x.mu.Lock()
	r, ok := x.recs[k]
	if !ok || x.busy[k] {
		x.mu.Unlock()
		return nil
	}
	x.busy[k] = true
	c := *r
	x.mu.Unlock()
	defer x.untake(&c)
	if err := x.undo(ctx, &c); err != nil {
		if c.State == exReleasing {
			x.log.Warn("exclusive ENI not removed yet; the maintenance loop retries", zap.String("pod", k), zap.Error(err))
			return nil
		}
		return err
	}
	x.log.Info("exclusive ENI released", zap.String("pod", k), zap.String("eni", c.ENIID))
	return nil
}

// GC releases the ENIs of gone pods, finishes interrupted operations, and deletes this node's
// exclusive ENIs the store does not know once a listing a ListingGrace later still shows them.
func (x *ExclusiveENIs) GC(ctx context.Context, livePods func() map[string]bool) (GCResult, error) {
	var res GCResult
	if livePods == nil {
		return res, errors.New("exclusive ENI GC without a live pod set: refusing to read it as \"no pod is alive\"")
	}
	live := livePods()
	if live == nil {
		return res, errors.New("exclusive ENI GC: the live pod set is unknown; nothing released")
	}
	var errs []error
	for _, r := range x.takeIdle(func(r *exRecord) bool { return r.State != exReady || !live[r.Namespace+"/"+r.Name] }) {
		wasReady := r.State == exReady
		if err := x.undo(ctx, r); err != nil {
			errs = append(errs, err)
		} else if wasReady {
			res.ReleasedAllocations = append(res.ReleasedAllocations, r.key())
		}
		x.untake(r)
	}
	deleted, err := x.sweep(ctx)
	res.DeletedENIs = deleted
	errs = append(errs, err)
	return res, errors.Join(errs...)
}

// sweep deletes listed exclusive ENIs of this node that no record names.
func (x *ExclusiveENIs) sweep(ctx context.Context) ([]string, error) {
	listedAt := x.d.Now()
	listed, err := x.cloud.ListENIs(ctx, aliyun.ENIFilter{Tags: x.ownTags()})
	if err != nil {
		return nil, fmt.Errorf("list exclusive ENIs: %w", err)
	}
	x.mu.Lock()
	known := map[string]bool{}
	for _, r := range x.recs {
		known[r.ENIID] = true
		known["token:"+r.Token] = true
	}
	var due []string
	seen := map[string]bool{}
	for _, e := range listed {
		if known[e.ID] || known["token:"+e.Tags[TagToken]] {
			continue
		}
		seen[e.ID] = true
		first, ok := x.suspects[e.ID]
		switch {
		case !ok:
			x.suspects[e.ID] = listedAt
		case listedAt.Sub(first) >= x.d.ListingGrace:
			due = append(due, e.ID)
		}
	}
	for id := range x.suspects {
		if !seen[id] {
			delete(x.suspects, id)
		}
	}
	x.mu.Unlock()
	var errs []error
	var deleted []string
	for _, id := range due {
		if err := x.destroy(ctx, id); err != nil {
			errs = append(errs, err)
			continue
		}
		x.mu.Lock()
		delete(x.suspects, id)
		x.mu.Unlock()
		deleted = append(deleted, id)
		x.log.Warn("deleted an exclusive ENI of this node that no pod record names", zap.String("eni", id))
	}
	return deleted, errors.Join(errs...)
}
