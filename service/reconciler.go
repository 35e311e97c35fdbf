package service

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/loader"
)

// LBMaps is the kernel seam: the three load-balancer maps the reconciler owns, plus a read
// of conntrack to know which reverse-NAT entries live flows still need. loader.Maps
// implements it.
type LBMaps interface {
	DumpServices() (map[loader.ServiceKey]loader.ServiceValue, error)
	DumpBackends() (map[loader.BackendKey]loader.BackendValue, error)
	DumpRevNAT() (map[loader.RevNATKey]loader.RevNATValue, error)
	DumpCT() (map[loader.CTKey]loader.CTValue, error)
	PutService(loader.ServiceKey, loader.ServiceValue) error
	DeleteService(loader.ServiceKey) error
	PutBackend(loader.BackendKey, loader.BackendValue) error
	DeleteBackend(loader.BackendKey) error
	PutRevNAT(loader.RevNATKey, loader.RevNATValue) error
	DeleteRevNAT(loader.RevNATKey) error
}

// BatchLBMaps is implemented by maps that can take many entries per syscall. The reconciler
// uses it to load a large desired state into empty maps (an agent's first start on a big
// cluster); everything else goes entry by entry.
type BatchLBMaps interface {
	PutServices([]loader.ServiceKey, []loader.ServiceValue) error
	PutBackends([]loader.BackendKey, []loader.BackendValue) error
	PutRevNATs([]loader.RevNATKey, []loader.RevNATValue) error
}

type realized struct {
	id    uint32
	slots []Backend // slot i+1 holds slots[i]
}

type revPair struct {
	backend  loader.RevNATKey
	frontend loader.RevNATFrontend
}

// Reconciler writes desired load-balancer state into the maps. It keeps a mirror of what
// it wrote, so an incremental change costs only the writes that change something; Sync
// re-reads the maps and repairs any drift.
//
// One reconciler owns all three LB maps because their write order is part of correctness:
// reverse-NAT entries before a backend can be chosen, backend slots before the frontend's
// count covers them, the count lowered before trailing slots go.
type Reconciler struct {
	maps LBMaps
	log  *zap.Logger

	mu       sync.Mutex
	fronts   map[Frontend]*realized
	usedIDs  map[uint32]bool
	nextID   uint32
	revnat   map[loader.RevNATKey][]loader.RevNATFrontend
	retired  map[revPair]bool // removed from desired; kept until no flow uses them
	writes   uint64
	overflow uint64
}

// NewReconciler reads the maps' current contents (left by a previous agent) as its
// starting point.
func NewReconciler(m LBMaps, log *zap.Logger) (*Reconciler, error) {
	if log == nil {
		log = zap.NewNop()
	}
	r := &Reconciler{maps: m, log: log}
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
	rev, err := r.maps.DumpRevNAT()
	if err != nil {
		return fmt.Errorf("read reverse-NAT map: %w", err)
	}
	r.fronts = map[Frontend]*realized{}
	r.usedIDs = map[uint32]bool{}
	r.nextID = 1
	byID := map[uint32]*realized{}
	for k, v := range svcs {
		f := Frontend{Addr: loader.BEToAddr(k.Addr), Port: loader.BEToPort(k.Port), Proto: Protocol(k.Proto)}
		re := &realized{id: v.Id, slots: make([]Backend, v.BackendCount)}
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
		re.slots[k.Slot-1] = Backend{Addr: loader.BEToAddr(v.Addr), Port: loader.BEToPort(v.Port)}
	}
	r.revnat = map[loader.RevNATKey][]loader.RevNATFrontend{}
	for k, v := range rev {
		n := min(int(v.Count), loader.RevNATMaxFrontends)
		r.revnat[k] = append([]loader.RevNATFrontend(nil), v.Frontends[:n]...)
	}
	r.retired = map[revPair]bool{}
	return errors.Join(errs...)
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
		return fmt.Errorf("the BPF map is full: raise its size (agent maxServices/maxBackends/maxRevNAT) "+
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

// RevNATOverflows counts backends that serve more frontends than the datapath can
// reverse-NAT (loader.RevNATMaxFrontends).
func (r *Reconciler) RevNATOverflows() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.overflow
}

// Lookup answers what a frontend should hold, and whether it should exist at all.
// State.Lookup and Builder.Desired are Lookups.
type Lookup func(Frontend) ([]Backend, bool)

// Lookup makes a State usable where a Lookup is wanted.
func (s State) Lookup(f Frontend) ([]Backend, bool) {
	bs, ok := s[f]
	return bs, ok
}

// Apply reconciles the given frontends against desired: each is created, updated or
// deleted (when desired lacks it). Other frontends are not touched, so their flows are
// undisturbed. Errors for one frontend do not stop the others.
func (r *Reconciler) Apply(desired Lookup, dirty []Frontend) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for _, f := range dirty {
		bs, ok := desired(f)
		var err error
		if ok {
			err = r.upsert(f, bs)
		} else {
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
func (r *Reconciler) Sync(desired State) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.load(); err != nil {
		return err
	}
	if bm, ok := r.maps.(BatchLBMaps); ok && len(r.fronts) == 0 && len(r.revnat) == 0 && len(desired) > 0 {
		return r.bulkLoad(bm, desired)
	}
	var errs []error
	for f := range r.fronts {
		if _, ok := desired[f]; !ok {
			if err := r.remove(f); err != nil {
				errs = append(errs, fmt.Errorf("frontend %s: %w", f, err))
			}
		}
	}
	wanted := map[revPair]bool{}
	for f, bs := range desired {
		if err := r.upsert(f, bs); err != nil {
			errs = append(errs, fmt.Errorf("frontend %s: %w", f, err))
		}
		for _, b := range bs {
			wanted[pairOf(f, b)] = true
		}
	}
	// Reverse-NAT entries nobody wants any more retire: they go once no flow uses them.
	for k, fes := range r.revnat {
		for _, fe := range fes {
			if p := (revPair{k, fe}); !wanted[p] {
				r.retired[p] = true
			}
		}
	}
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

func svcKey(f Frontend) loader.ServiceKey {
	return loader.ServiceKey{Addr: loader.AddrToBE(f.Addr), Port: loader.PortToBE(f.Port), Proto: uint8(f.Proto)}
}

func pairOf(f Frontend, b Backend) revPair {
	return revPair{
		backend:  loader.RevNATKey{Addr: loader.AddrToBE(b.Addr), Port: loader.PortToBE(b.Port), Proto: uint8(f.Proto)},
		frontend: loader.RevNATFrontend{Addr: loader.AddrToBE(f.Addr), Port: loader.PortToBE(f.Port)},
	}
}

// layout places the desired backends into slots, keeping every surviving backend in the
// slot it already has so that as few slots as possible are rewritten.
func layout(old, desired []Backend) []Backend {
	want := map[Backend]bool{}
	for _, b := range desired {
		want[b] = true
	}
	slots := make([]Backend, len(old))
	have := map[Backend]bool{}
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

func (r *Reconciler) upsert(f Frontend, desired []Backend) error {
	cur := r.fronts[f]
	if cur == nil {
		id, err := r.allocID()
		if err != nil {
			return err
		}
		cur = &realized{id: id}
	}
	slots := layout(cur.slots, desired)

	// 1. Reverse NAT for every backend, before any new flow can reach it.
	for _, b := range slots {
		if err := r.addRevNAT(pairOf(f, b)); err != nil {
			return err
		}
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
	// 3. The frontend, once the slots it counts are in place.
	if _, exists := r.fronts[f]; !exists || len(cur.slots) != len(slots) {
		v := loader.ServiceValue{Id: cur.id, BackendCount: uint16(len(slots))}
		if err := r.put(func() error { return r.maps.PutService(svcKey(f), v) }); err != nil {
			return fmt.Errorf("write frontend: %w", err)
		}
	}
	// 4. Slots past the new count.
	var errs []error
	for i := len(slots); i < len(cur.slots); i++ {
		k := loader.BackendKey{SvcId: cur.id, Slot: uint32(i + 1)}
		errs = append(errs, r.del(func() error { return r.maps.DeleteBackend(k) }))
	}
	// 5. Backends that left retire; their reverse NAT stays while flows use them.
	kept := make(map[Backend]bool, len(slots))
	for _, b := range slots {
		kept[b] = true
	}
	for _, b := range cur.slots {
		// A zero Backend is a slot found missing in the map (drift), not a backend.
		if b.Addr.IsValid() && !kept[b] {
			r.retired[pairOf(f, b)] = true
		}
	}
	for _, b := range slots {
		delete(r.retired, pairOf(f, b))
	}
	cur.slots = slots
	r.fronts[f] = cur
	return errors.Join(errs...)
}

func (r *Reconciler) remove(f Frontend) error {
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
	for _, b := range cur.slots {
		if b.Addr.IsValid() {
			r.retired[pairOf(f, b)] = true
		}
	}
	delete(r.fronts, f)
	delete(r.usedIDs, cur.id)
	return errors.Join(errs...)
}

func (r *Reconciler) addRevNAT(p revPair) error {
	fes := r.revnat[p.backend]
	for _, fe := range fes {
		if fe == p.frontend {
			return nil
		}
	}
	if len(fes) >= loader.RevNATMaxFrontends {
		r.overflow++
		r.log.Warn("backend serves more frontends than the datapath can reverse-NAT; replies through the extra ones will not be translated",
			zap.Stringer("backend", netip.AddrPortFrom(loader.BEToAddr(p.backend.Addr), loader.BEToPort(p.backend.Port))),
			zap.Int("limit", loader.RevNATMaxFrontends))
		return nil
	}
	fes = append(fes, p.frontend)
	if err := r.writeRevNAT(p.backend, fes); err != nil {
		return err
	}
	r.revnat[p.backend] = fes
	return nil
}

func (r *Reconciler) writeRevNAT(k loader.RevNATKey, fes []loader.RevNATFrontend) error {
	if len(fes) == 0 {
		return r.del(func() error { return r.maps.DeleteRevNAT(k) })
	}
	var v loader.RevNATValue
	v.Count = uint32(len(fes))
	copy(v.Frontends[:], fes)
	if err := r.put(func() error { return r.maps.PutRevNAT(k, v) }); err != nil {
		return fmt.Errorf("write reverse-NAT entry: %w", err)
	}
	return nil
}

// CollectRevNAT removes retired reverse-NAT entries that no live conntrack entry needs.
// The agent runs it periodically; until then, established flows to a removed backend keep
// getting their replies translated, as they do with kube-proxy's conntrack.
func (r *Reconciler) CollectRevNAT() (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.retired) == 0 {
		return 0, nil
	}
	ct, err := r.maps.DumpCT()
	if err != nil {
		return 0, fmt.Errorf("read conntrack: %w", err)
	}
	// Entries past their deadline are dead flows the LRU has not evicted yet; the datapath
	// treats them as new flows, so they need no reverse NAT. The deadline is CLOCK_MONOTONIC.
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("read the monotonic clock: %w", err)
	}
	now := uint64(ts.Nano())
	inUse := map[revPair]bool{}
	for k, v := range ct {
		if v.ExpiresNs < now {
			continue
		}
		inUse[revPair{
			backend:  loader.RevNATKey{Addr: v.BackendAddr, Port: v.BackendPort, Proto: k.Proto},
			frontend: loader.RevNATFrontend{Addr: k.Daddr, Port: k.Dport},
		}] = true
	}
	removed := 0
	var errs []error
	for p := range r.retired {
		if inUse[p] {
			continue
		}
		fes := r.revnat[p.backend]
		kept := fes[:0:0]
		for _, fe := range fes {
			if fe != p.frontend {
				kept = append(kept, fe)
			}
		}
		if len(kept) != len(fes) {
			if err := r.writeRevNAT(p.backend, kept); err != nil {
				errs = append(errs, err)
				continue
			}
			if len(kept) == 0 {
				delete(r.revnat, p.backend)
			} else {
				r.revnat[p.backend] = kept
			}
			removed++
		}
		delete(r.retired, p)
	}
	return removed, errors.Join(errs...)
}

// bulkLoad writes a whole desired state into empty maps with batch updates, in the same
// order the per-entry path keeps: reverse NAT, then slots, then frontends.
func (r *Reconciler) bulkLoad(bm BatchLBMaps, desired State) error {
	var (
		sk []loader.ServiceKey
		sv []loader.ServiceValue
		bk []loader.BackendKey
		bv []loader.BackendValue
	)
	fronts := make(map[Frontend]*realized, len(desired))
	rev := map[loader.RevNATKey][]loader.RevNATFrontend{}
	for f, bs := range desired {
		id, err := r.allocID()
		if err != nil {
			return err
		}
		re := &realized{id: id, slots: append([]Backend(nil), bs...)}
		fronts[f] = re
		for i, b := range bs {
			bk = append(bk, loader.BackendKey{SvcId: id, Slot: uint32(i + 1)})
			bv = append(bv, loader.BackendValue{Addr: loader.AddrToBE(b.Addr), Port: loader.PortToBE(b.Port)})
			p := pairOf(f, b)
			if len(rev[p.backend]) >= loader.RevNATMaxFrontends {
				r.overflow++
				continue
			}
			rev[p.backend] = append(rev[p.backend], p.frontend)
		}
		sk = append(sk, svcKey(f))
		sv = append(sv, loader.ServiceValue{Id: id, BackendCount: uint16(len(bs))})
	}
	rk := make([]loader.RevNATKey, 0, len(rev))
	rv := make([]loader.RevNATValue, 0, len(rev))
	for k, fes := range rev {
		var v loader.RevNATValue
		v.Count = uint32(len(fes))
		copy(v.Frontends[:], fes)
		rk = append(rk, k)
		rv = append(rv, v)
	}
	if err := bm.PutRevNATs(rk, rv); err != nil {
		return fmt.Errorf("load reverse-NAT entries: %w", err)
	}
	if err := bm.PutBackends(bk, bv); err != nil {
		return fmt.Errorf("load backend slots: %w", err)
	}
	if err := bm.PutServices(sk, sv); err != nil {
		return fmt.Errorf("load frontends: %w", err)
	}
	r.writes += uint64(len(rk) + len(bk) + len(sk))
	r.fronts = fronts
	r.revnat = rev
	return nil
}
