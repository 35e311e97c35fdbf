// Package lbmap encodes load-balancer state (service.State and service.Options: what the
// Services mean) into the datapath's LB maps and keeps them reconciled: frontends, backend
// slots, the backend membership index, per-frontend options and Maglev tables, written in an
// order that keeps every reader safe.
package lbmap

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/service"
)

// LBMaps is the kernel seam: the three load-balancer maps the reconciler owns.
// loader.Maps implements it.
type LBMaps interface {
	DumpServices() (map[loader.ServiceKey]loader.ServiceValue, error)
	DumpBackends() (map[loader.BackendKey]loader.BackendValue, error)
	DumpMembers() (map[loader.MemberKey]uint32, error)
	PutService(loader.ServiceKey, loader.ServiceValue) error
	DeleteService(loader.ServiceKey) error
	PutBackend(loader.BackendKey, loader.BackendValue) error
	DeleteBackend(loader.BackendKey) error
	PutMember(loader.MemberKey, uint32) error
	DeleteMember(loader.MemberKey) error
	DumpOpts() (map[uint32]loader.SvcOpts, error)
	DumpMaglev() (map[loader.MaglevKey]loader.MaglevValue, error)
	PutOpts(uint32, loader.SvcOpts) error
	DeleteOpts(uint32) error
	PutMaglev(loader.MaglevKey, loader.MaglevValue) error
	DeleteMaglev(loader.MaglevKey) error
}

// BatchLBMaps is implemented by maps that can take many entries per syscall. The reconciler
// uses it to load a large desired state into empty maps (an agent's first start on a big
// cluster); everything else goes entry by entry.
type BatchLBMaps interface {
	PutServices([]loader.ServiceKey, []loader.ServiceValue) error
	PutBackends([]loader.BackendKey, []loader.BackendValue) error
	PutMembers([]loader.MemberKey, []uint32) error
}

// SrcRangeMaps is implemented by maps that hold loadBalancerSourceRanges (loader.Maps).
// With maps that lack it the reconciler never sets a frontend's source-ranges flag, so
// older test doubles keep working.
type SrcRangeMaps interface {
	DumpSrcRanges() (map[loader.SrcRangeKey]uint8, error)
	PutSrcRange(loader.SrcRangeKey) error
	DeleteSrcRange(loader.SrcRangeKey) error
}

type realized struct {
	id     uint32
	ranges map[netip.Prefix]bool // tern_lb_src_ranges entries as written
	slots  []service.Backend     // slot i+1 holds slots[i]
	flags  uint16                // svc_value.flags as written
	opts   loader.SvcOpts        // tern_lb_svc_opts entry; written when flags need it
	hasOpt bool
	blocks []loader.MaglevValue // Maglev table blocks 0..len-1 as written
}

// encoded is what a frontend's options become in the maps.
type encoded struct {
	ranges []netip.Prefix
	flags  uint16
	opts   loader.SvcOpts
	hasOpt bool
	blocks []loader.MaglevValue
}

// encode turns a frontend's options and slot layout into map values. The Maglev table is
// built over the slots, so each entry names a slot directly.
func encode(o service.Options, slots []service.Backend) encoded {
	var e encoded
	if o.AffinitySeconds != 0 {
		e.flags |= loader.SvcFlagAffinity
		e.opts.AffinityTimeoutS = o.AffinitySeconds
	}
	if o.MaglevSize != 0 && len(slots) > 0 {
		e.flags |= loader.SvcFlagMaglev
		e.opts.MaglevSize = o.MaglevSize
		table := service.Maglev(slots, o.MaglevSize)
		e.blocks = make([]loader.MaglevValue, (len(table)+loader.MaglevBlock-1)/loader.MaglevBlock)
		for i, idx := range table {
			e.blocks[i/loader.MaglevBlock].Slot[i%loader.MaglevBlock] = uint16(idx + 1)
		}
	}
	if o.DropWhenEmpty {
		e.flags |= loader.SvcFlagDropEmpty
	}
	if o.Kind.External() {
		e.flags |= loader.SvcFlagExternal
	}
	// The kind, for operators only (ternctl bpf lb list): no program reads these bits.
	e.flags |= uint16(o.Kind) << loader.SvcKindShift & loader.SvcKindMask
	if o.ExternalLocal {
		e.flags |= loader.SvcFlagExtLocal
	}
	if o.Kind == service.KindLoadBalancer && o.SourceRanges != "" {
		e.flags |= loader.SvcFlagSrcRanges
		e.ranges = o.Prefixes()
	}
	e.hasOpt = e.flags&(loader.SvcFlagAffinity|loader.SvcFlagMaglev) != 0
	return e
}

// Reconciler writes desired load-balancer state into the maps. It keeps a mirror of what
// it wrote, so an incremental change costs only the writes that change something; Sync
// re-reads the maps and repairs any drift.
//
// One reconciler owns all three LB maps because their write order is part of correctness:
// a backend is a member of its frontend before a flow can be given it, backend slots are
// written before the frontend's count covers them, the count is lowered before trailing
// slots go, and membership ends only once the backend has no slot.
//
// Replies need nothing from these maps: a flow's conntrack entry carries the frontend to
// restore, so removing a backend or a frontend never breaks the replies of live flows.
type Reconciler struct {
	maps LBMaps
	log  *zap.Logger

	mu      sync.Mutex
	fronts  map[service.Frontend]*realized
	usedIDs map[uint32]bool
	nextID  uint32
	members map[loader.MemberKey]uint32 // membership entries as written: the backend's slot
	writes  uint64

	// Frontends of another owner than the Service controller: the pods' hostPorts
	// (SetExtra). Sync keeps them, and Apply puts them back when a Service that shared the
	// address gives it up. byService is what the Service side last asked for, so that
	// SetExtra never overwrites a Service's frontend: on a clash the Service wins, as the
	// cluster-wide intent.
	extra     service.State
	byService map[service.Frontend]bool
}

// NewReconciler reads the maps' current contents (left by a previous agent) as its
// starting point.
func NewReconciler(m LBMaps, log *zap.Logger) (*Reconciler, error) {
	if log == nil {
		log = zap.NewNop()
	}
	r := &Reconciler{maps: m, log: log, extra: service.State{}, byService: map[service.Frontend]bool{}}
	if err := r.load(); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *Reconciler) load() error {
	svcs, err := r.maps.DumpServices()
	if err != nil {
		return fmt.Errorf("read service map: %w", err)
	}
	bes, err := r.maps.DumpBackends()
	if err != nil {
		return fmt.Errorf("read backend map: %w", err)
	}
	mem, err := r.maps.DumpMembers()
	if err != nil {
		return fmt.Errorf("read backend membership map: %w", err)
	}
	opts, err := r.maps.DumpOpts()
	if err != nil {
		return fmt.Errorf("read frontend options map: %w", err)
	}
	mag, err := r.maps.DumpMaglev()
	if err != nil {
		return fmt.Errorf("read Maglev table map: %w", err)
	}
	r.fronts = map[service.Frontend]*realized{}
	r.usedIDs = map[uint32]bool{}
	r.nextID = 1
	byID := map[uint32]*realized{}
	for k, v := range svcs {
		f := service.Frontend{Addr: loader.BEToAddr(k.Addr), Port: loader.BEToPort(k.Port), Proto: service.Protocol(k.Proto),
			Internal: k.Scope == loader.SvcScopeInternal}
		re := &realized{id: v.Id, slots: make([]service.Backend, v.BackendCount), flags: v.Flags}
		r.fronts[f] = re
		r.usedIDs[v.Id] = true
		byID[v.Id] = re
	}
	// Slots that no frontend covers are leftovers of an interrupted update: remove them.
	var errs []error
	for k, v := range bes {
		re, ok := byID[k.SvcId]
		if !ok || k.Slot == 0 || int(k.Slot) > len(re.slots) {
			errs = append(errs, r.del(func() error { return r.maps.DeleteBackend(k) }))
			continue
		}
		re.slots[k.Slot-1] = service.Backend{Addr: loader.BEToAddr(v.Addr), Port: loader.BEToPort(v.Port)}
	}
	// Options and Maglev blocks of frontends that do not exist are leftovers too. A block
	// missing from a table leaves a zero entry in the mirror, so the next upsert rewrites it.
	for id, o := range opts {
		re, ok := byID[id]
		if !ok {
			errs = append(errs, r.del(func() error { return r.maps.DeleteOpts(id) }))
			continue
		}
		re.opts, re.hasOpt = o, true
	}
	for k, v := range mag {
		re, ok := byID[k.SvcId]
		if !ok || k.Block >= 1<<16 {
			errs = append(errs, r.del(func() error { return r.maps.DeleteMaglev(k) }))
			continue
		}
		for uint32(len(re.blocks)) <= k.Block {
			re.blocks = append(re.blocks, loader.MaglevValue{})
		}
		re.blocks[k.Block] = v
	}
	// Source ranges of frontends that do not exist are leftovers too.
	if sm, ok := r.maps.(SrcRangeMaps); ok {
		rs, err := sm.DumpSrcRanges()
		if err != nil {
			return fmt.Errorf("read source range map: %w", err)
		}
		for k := range rs {
			re, ok := byID[k.SvcId]
			if !ok {
				errs = append(errs, r.del(func() error { return sm.DeleteSrcRange(k) }))
				continue
			}
			if re.ranges == nil {
				re.ranges = map[netip.Prefix]bool{}
			}
			re.ranges[k.Prefix()] = true
		}
	}
	// Membership must match the slots exactly: a member without a slot would keep a removed
	// backend's UDP flows alive, a slot without a member would move them needlessly. A map
	// left by an older layout has no members at all; they are rebuilt here, before any
	// program that reads them is attached.
	r.members = map[loader.MemberKey]uint32{}
	want := map[loader.MemberKey]uint32{}
	for _, re := range byID {
		for i, b := range re.slots {
			if b.Addr.IsValid() {
				want[memberKey(re.id, b)] = uint32(i + 1)
			}
		}
	}
	for k, slot := range mem {
		if _, ok := want[k]; !ok {
			errs = append(errs, r.del(func() error { return r.maps.DeleteMember(k) }))
			continue
		}
		r.members[k] = slot
	}
	// A missing member is restored; one naming another slot (the slot it had before an
	// interrupted move) is corrected: affinity finds a backend's slot through it.
	for k, slot := range want {
		if r.members[k] != slot {
			if err := r.put(func() error { return r.maps.PutMember(k, slot) }); err != nil {
				errs = append(errs, fmt.Errorf("restore backend membership: %w", err))
				continue
			}
			r.members[k] = slot
		}
	}
	return errors.Join(errs...)
}

// encode is the package's encode, less the source-ranges flag where the maps cannot hold
// ranges.
func (r *Reconciler) encode(o service.Options, slots []service.Backend) encoded {
	e := encode(o, slots)
	if _, ok := r.maps.(SrcRangeMaps); !ok && e.flags&loader.SvcFlagSrcRanges != 0 {
		e.flags &^= loader.SvcFlagSrcRanges
		e.ranges = nil
	}
	return e
}

// putRanges writes the ranges re lacks (before its flag may point at them).
func (r *Reconciler) putRanges(re *realized, want []netip.Prefix) error {
	sm, ok := r.maps.(SrcRangeMaps)
	if !ok {
		return nil
	}
	if re.ranges == nil {
		re.ranges = map[netip.Prefix]bool{}
	}
	for _, p := range want {
		if re.ranges[p] {
			continue
		}
		if err := r.put(func() error { return sm.PutSrcRange(loader.SrcRangeKeyOf(re.id, p)) }); err != nil {
			return fmt.Errorf("write source range %s: %w", p, err)
		}
		re.ranges[p] = true
	}
	return nil
}

// dropRanges deletes the ranges of re that want lacks (after its flag stopped needing them).
func (r *Reconciler) dropRanges(re *realized, want []netip.Prefix) error {
	sm, ok := r.maps.(SrcRangeMaps)
	if !ok {
		return nil
	}
	keep := map[netip.Prefix]bool{}
	for _, p := range want {
		keep[p] = true
	}
	var errs []error
	for p := range re.ranges {
		if keep[p] {
			continue
		}
		if err := r.del(func() error { return sm.DeleteSrcRange(loader.SrcRangeKeyOf(re.id, p)) }); err != nil {
			errs = append(errs, fmt.Errorf("delete source range %s: %w", p, err))
			continue
		}
		delete(re.ranges, p)
	}
	return errors.Join(errs...)
}

func memberKey(id uint32, b service.Backend) loader.MemberKey {
	return loader.MemberKey{SvcId: id, Addr: loader.AddrToBE(b.Addr), Port: loader.PortToBE(b.Port)}
}

func (r *Reconciler) del(fn func() error) error {
	r.writes++
	if err := fn(); err != nil && !loader.IsNotExist(err) {
		return err
	}
	return nil
}

func (r *Reconciler) put(fn func() error) error {
	r.writes++
	err := fn()
	if errors.Is(err, unix.E2BIG) {
		// The kernel's answer to an insert into a full map; say what to do about it.
		return fmt.Errorf("the BPF map is full: raise its size (agent maxServices/maxBackends) "+
			"or remove Services: %w", err)
	}
	return err
}

// Writes counts map writes and deletes so far (for tests and metrics).
func (r *Reconciler) Writes() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.writes
}

// Apply reconciles the given frontends against desired: each is created, updated or
// deleted (when desired lacks it). Other frontends are not touched, so their flows are
// undisturbed. Errors for one frontend do not stop the others.
func (r *Reconciler) Apply(desired service.Lookup, dirty []service.Frontend) error {
	return r.ApplyWith(desired, nil, dirty)
}

// ApplyWith is Apply with each frontend's options (affinity, Maglev, traffic policy) from
// opts; nil means the defaults for all.
func (r *Reconciler) ApplyWith(desired service.Lookup, opts service.OptionsLookup, dirty []service.Frontend) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for _, f := range dirty {
		bs, ok := desired(f)
		var err error
		switch extra, isExtra := r.extra[f]; {
		case ok:
			r.byService[f] = true
			err = r.upsert(f, bs, optionsOf(opts, f))
		case isExtra:
			delete(r.byService, f)
			err = r.upsert(f, extra, extraOptions())
		default:
			delete(r.byService, f)
			err = r.remove(f)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("frontend %s: %w", f, err))
		}
	}
	return errors.Join(errs...)
}

// Sync re-reads the maps and reconciles every frontend, desired or present: the periodic
// full resync that repairs drift and removes what nobody wants.
func (r *Reconciler) Sync(desired service.State) error { return r.SyncWith(desired, nil) }

// SyncWith is Sync with each frontend's options from opts (nil: the defaults).
func (r *Reconciler) SyncWith(desired service.State, opts service.OptionsLookup) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.load(); err != nil {
		return err
	}
	r.byService = make(map[service.Frontend]bool, len(desired))
	for f := range desired {
		r.byService[f] = true
	}
	if len(r.extra) > 0 {
		merged := make(service.State, len(desired)+len(r.extra))
		for f, bs := range r.extra {
			merged[f] = bs
		}
		for f, bs := range desired {
			merged[f] = bs
		}
		desired = merged
		opts = r.serviceOptionsOnly(opts)
	}
	if bm, ok := r.maps.(BatchLBMaps); ok && len(r.fronts) == 0 && len(r.members) == 0 && len(desired) > 0 {
		return r.bulkLoad(bm, desired, opts)
	}
	var errs []error
	for f := range r.fronts {
		if _, ok := desired[f]; !ok {
			if err := r.remove(f); err != nil {
				errs = append(errs, fmt.Errorf("frontend %s: %w", f, err))
			}
		}
	}
	for f, bs := range desired {
		if err := r.upsert(f, bs, optionsOf(opts, f)); err != nil {
			errs = append(errs, fmt.Errorf("frontend %s: %w", f, err))
		}
	}
	return errors.Join(errs...)
}

// serviceOptionsOnly gives the extra frontends the default options whatever opts says: a
// Service's annotations never apply to a hostPort.
func (r *Reconciler) serviceOptionsOnly(opts service.OptionsLookup) service.OptionsLookup {
	return func(f service.Frontend) service.Options {
		if !r.byService[f] {
			return extraOptions()
		}
		return optionsOf(opts, f)
	}
}

// extraOptions are the options of every extra frontend: a hostPort, which clients outside
// the node reach through the netdev programs like a NodePort (random selection among its one
// backend, reject when empty).
func extraOptions() service.Options { return service.Options{Kind: service.KindHostPort} }

// SetExtra replaces the frontends owned by another writer than the Service controller (the
// agent's hostPorts) and writes the difference: new and changed ones are upserted, dropped
// ones removed. A frontend a Service also has is left to the Service until the Service
// gives it up. Such frontends get extraOptions.
func (r *Reconciler) SetExtra(extra service.State) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for f := range r.extra {
		if _, keep := extra[f]; keep || r.byService[f] {
			continue
		}
		if err := r.remove(f); err != nil {
			errs = append(errs, fmt.Errorf("frontend %s: %w", f, err))
		}
	}
	next := make(service.State, len(extra))
	for f, bs := range extra {
		next[f] = append([]service.Backend(nil), bs...)
		if r.byService[f] {
			r.log.Warn("a hostPort has the address, port and protocol of a Service frontend; the Service keeps it",
				zap.Stringer("frontend", f))
			continue
		}
		if err := r.upsert(f, bs, extraOptions()); err != nil {
			errs = append(errs, fmt.Errorf("frontend %s: %w", f, err))
		}
	}
	r.extra = next
	return errors.Join(errs...)
}

func (r *Reconciler) allocID() (uint32, error) {
	for range 1 << 20 {
		id := r.nextID
		r.nextID++
		if r.nextID == 0 {
			r.nextID = 1
		}
		if !r.usedIDs[id] {
			r.usedIDs[id] = true
			return id, nil
		}
	}
	return 0, errors.New("no free service id")
}

func svcKey(f service.Frontend) loader.ServiceKey {
	k := loader.ServiceKey{Addr: loader.AddrToBE(f.Addr), Port: loader.PortToBE(f.Port), Proto: uint8(f.Proto)}
	if f.Internal {
		k.Scope = loader.SvcScopeInternal
	}
	return k
}

// layout places the desired backends into slots, keeping every surviving backend in the
// slot it already has so that as few slots as possible are rewritten.
func layout(old, desired []service.Backend) []service.Backend {
	want := map[service.Backend]bool{}
	for _, b := range desired {
		want[b] = true
	}
	slots := make([]service.Backend, len(old))
	have := map[service.Backend]bool{}
	var holes []int
	for i, b := range old {
		if want[b] && !have[b] {
			slots[i] = b
			have[b] = true
		} else {
			holes = append(holes, i)
		}
	}
	for _, b := range desired {
		if have[b] {
			continue
		}
		if len(holes) > 0 {
			slots[holes[0]] = b
			holes = holes[1:]
		} else {
			slots = append(slots, b)
		}
	}
	// Close remaining holes with entries from the end.
	for len(holes) > 0 {
		last := len(slots) - 1
		if holes[len(holes)-1] == last {
			holes = holes[:len(holes)-1]
			slots = slots[:last]
			continue
		}
		slots[holes[0]] = slots[last]
		slots = slots[:last]
		holes = holes[1:]
	}
	return slots
}

func optionsOf(l service.OptionsLookup, f service.Frontend) service.Options {
	if l == nil {
		return service.Options{}
	}
	return l(f)
}

func (r *Reconciler) upsert(f service.Frontend, desired []service.Backend, o service.Options) error {
	cur := r.fronts[f]
	if cur == nil {
		id, err := r.allocID()
		if err != nil {
			return err
		}
		cur = &realized{id: id}
	}
	slots := layout(cur.slots, desired)
	enc := r.encode(o, slots)

	// 1. Membership for every backend, before any new flow can be given it.
	for i, b := range slots {
		k := memberKey(cur.id, b)
		if _, ok := r.members[k]; ok {
			continue
		}
		if err := r.put(func() error { return r.maps.PutMember(k, uint32(i+1)) }); err != nil {
			return fmt.Errorf("write backend membership: %w", err)
		}
		r.members[k] = uint32(i + 1)
	}
	// 2. Slots that change.
	for i, b := range slots {
		if i < len(cur.slots) && cur.slots[i] == b {
			continue
		}
		k := loader.BackendKey{SvcId: cur.id, Slot: uint32(i + 1)}
		v := loader.BackendValue{Addr: loader.AddrToBE(b.Addr), Port: loader.PortToBE(b.Port)}
		if err := r.put(func() error { return r.maps.PutBackend(k, v) }); err != nil {
			return fmt.Errorf("write backend slot %d: %w", i+1, err)
		}
	}
	// 2b. A backend that moved to another slot (into a hole a removed one left) gets its
	// membership entry pointed at the new slot, now that the slot holds it: affinity finds
	// a client's backend through it (lb_pick_backend checks the slot still holds it).
	for i, b := range slots {
		k := memberKey(cur.id, b)
		if r.members[k] == uint32(i+1) {
			continue
		}
		if err := r.put(func() error { return r.maps.PutMember(k, uint32(i+1)) }); err != nil {
			return fmt.Errorf("move backend membership to slot %d: %w", i+1, err)
		}
		r.members[k] = uint32(i + 1)
	}
	// 3. Options and Maglev blocks that change, before the flags point at them. A table
	// entry naming a slot beyond the count in force is harmless: the datapath then picks
	// at random (lb_pick_backend).
	if enc.hasOpt && (!cur.hasOpt || cur.opts != enc.opts) {
		if err := r.put(func() error { return r.maps.PutOpts(cur.id, enc.opts) }); err != nil {
			return fmt.Errorf("write frontend options: %w", err)
		}
		cur.opts, cur.hasOpt = enc.opts, true
	}
	for i, v := range enc.blocks {
		if i < len(cur.blocks) && cur.blocks[i] == v {
			continue
		}
		k := loader.MaglevKey{SvcId: cur.id, Block: uint32(i)}
		if err := r.put(func() error { return r.maps.PutMaglev(k, v) }); err != nil {
			return fmt.Errorf("write Maglev table block %d: %w", i, err)
		}
	}
	if err := r.putRanges(cur, enc.ranges); err != nil {
		return err
	}
	// 4. The frontend, once the slots it counts and the options its flags name are in place.
	if _, exists := r.fronts[f]; !exists || len(cur.slots) != len(slots) || cur.flags != enc.flags {
		v := loader.ServiceValue{Id: cur.id, BackendCount: uint16(len(slots)), Flags: enc.flags}
		if err := r.put(func() error { return r.maps.PutService(svcKey(f), v) }); err != nil {
			return fmt.Errorf("write frontend: %w", err)
		}
	}
	cur.flags = enc.flags
	// 5. Slots past the new count, table blocks past the new table, options no flag needs.
	var errs []error
	for i := len(slots); i < len(cur.slots); i++ {
		k := loader.BackendKey{SvcId: cur.id, Slot: uint32(i + 1)}
		errs = append(errs, r.del(func() error { return r.maps.DeleteBackend(k) }))
	}
	for i := len(enc.blocks); i < len(cur.blocks); i++ {
		k := loader.MaglevKey{SvcId: cur.id, Block: uint32(i)}
		errs = append(errs, r.del(func() error { return r.maps.DeleteMaglev(k) }))
	}
	cur.blocks = enc.blocks
	errs = append(errs, r.dropRanges(cur, enc.ranges))
	if !enc.hasOpt && cur.hasOpt {
		errs = append(errs, r.del(func() error { return r.maps.DeleteOpts(cur.id) }))
		cur.opts, cur.hasOpt = loader.SvcOpts{}, false
	}
	// 6. Backends that left stop being members: their UDP flows move on their next datagram,
	// a new SYN on a reused tuple picks a live backend, and affinity no longer leads to
	// them; established TCP flows continue.
	kept := make(map[service.Backend]bool, len(slots))
	for _, b := range slots {
		kept[b] = true
	}
	for _, b := range cur.slots {
		// A zero Backend is a slot found missing in the map (drift), not a backend.
		if b.Addr.IsValid() && !kept[b] {
			errs = append(errs, r.dropMember(memberKey(cur.id, b)))
		}
	}
	cur.slots = slots
	r.fronts[f] = cur
	return errors.Join(errs...)
}

func (r *Reconciler) remove(f service.Frontend) error {
	cur, ok := r.fronts[f]
	if !ok {
		return nil
	}
	if err := r.del(func() error { return r.maps.DeleteService(svcKey(f)) }); err != nil {
		return fmt.Errorf("delete frontend: %w", err)
	}
	var errs []error
	for i := range cur.slots {
		k := loader.BackendKey{SvcId: cur.id, Slot: uint32(i + 1)}
		errs = append(errs, r.del(func() error { return r.maps.DeleteBackend(k) }))
	}
	for i := range cur.blocks {
		k := loader.MaglevKey{SvcId: cur.id, Block: uint32(i)}
		errs = append(errs, r.del(func() error { return r.maps.DeleteMaglev(k) }))
	}
	if cur.hasOpt {
		errs = append(errs, r.del(func() error { return r.maps.DeleteOpts(cur.id) }))
	}
	errs = append(errs, r.dropRanges(cur, nil))
	for _, b := range cur.slots {
		if b.Addr.IsValid() {
			errs = append(errs, r.dropMember(memberKey(cur.id, b)))
		}
	}
	delete(r.fronts, f)
	delete(r.usedIDs, cur.id)
	return errors.Join(errs...)
}

func (r *Reconciler) dropMember(k loader.MemberKey) error {
	if err := r.del(func() error { return r.maps.DeleteMember(k) }); err != nil {
		return fmt.Errorf("delete backend membership: %w", err)
	}
	delete(r.members, k)
	return nil
}

// bulkLoad writes a whole desired state into empty maps with batch updates, in the same
// order the per-entry path keeps: membership, then slots, then frontends.
func (r *Reconciler) bulkLoad(bm BatchLBMaps, desired service.State, opts service.OptionsLookup) error {
	var (
		sk []loader.ServiceKey
		sv []loader.ServiceValue
		bk []loader.BackendKey
		bv []loader.BackendValue
		mk []loader.MemberKey
		mv []uint32
	)
	fronts := make(map[service.Frontend]*realized, len(desired))
	members := map[loader.MemberKey]uint32{}
	for f, bs := range desired {
		id, err := r.allocID()
		if err != nil {
			return err
		}
		re := &realized{id: id, slots: append([]service.Backend(nil), bs...)}
		enc := r.encode(optionsOf(opts, f), re.slots)
		re.flags, re.opts, re.hasOpt, re.blocks = enc.flags, enc.opts, enc.hasOpt, enc.blocks
		if len(enc.ranges) > 0 {
			// Few (LoadBalancer IPs with ranges): entry by entry, before the frontend.
			if err := r.putRanges(re, enc.ranges); err != nil {
				return err
			}
		}
		fronts[f] = re
		for i, b := range bs {
			bk = append(bk, loader.BackendKey{SvcId: id, Slot: uint32(i + 1)})
			bv = append(bv, loader.BackendValue{Addr: loader.AddrToBE(b.Addr), Port: loader.PortToBE(b.Port)})
			k := memberKey(id, b)
			mk = append(mk, k)
			mv = append(mv, uint32(i+1))
			members[k] = uint32(i + 1)
		}
		sk = append(sk, svcKey(f))
		sv = append(sv, loader.ServiceValue{Id: id, BackendCount: uint16(len(bs)), Flags: re.flags})
	}
	if err := bm.PutMembers(mk, mv); err != nil {
		return fmt.Errorf("load backend membership: %w", err)
	}
	if err := bm.PutBackends(bk, bv); err != nil {
		return fmt.Errorf("load backend slots: %w", err)
	}
	// Options and Maglev tables are few (only frontends that ask for them): entry by entry.
	for _, re := range fronts {
		if re.hasOpt {
			if err := r.put(func() error { return r.maps.PutOpts(re.id, re.opts) }); err != nil {
				return fmt.Errorf("load frontend options: %w", err)
			}
		}
		for i, v := range re.blocks {
			k := loader.MaglevKey{SvcId: re.id, Block: uint32(i)}
			if err := r.put(func() error { return r.maps.PutMaglev(k, v) }); err != nil {
				return fmt.Errorf("load Maglev table block %d: %w", i, err)
			}
		}
	}
	if err := bm.PutServices(sk, sv); err != nil {
		return fmt.Errorf("load frontends: %w", err)
	}
	r.writes += uint64(len(mk) + len(bk) + len(sk))
	r.fronts = fronts
	r.members = members
	return nil
}
