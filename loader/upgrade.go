package loader

// Upgrades: an agent of this layout starting on a node whose pins were left by an older
// one. The node must keep forwarding throughout, so nothing here detaches a program or
// refuses to start:
//
//  1. Load moves every pinned map whose layout changed aside (renamed to
//     <name>_old_<unix time>: bpffs refuses dots in names) before the new maps are
//     created; entries are copied over when only the size or flags changed (same key and
//     value). The old programs keep their maps: moving or removing a pin does not free a
//     map that an attached program holds.
//  2. Load converts the live flows of the first layout's conntrack (tern_ct) into this
//     layout's pair of entries (the client's tuple and the translated one), exactly as svc_open would have written them,
//     so established flows keep their backend. The service maps keep their layout and are
//     taken over by the reconciler, which rebuilds the membership index from their slots.
//  3. The agent re-attaches every pod (ReattachPods): tcx link update or clsact filter
//     replace, both atomic per hook.
//     It converts again right before swapping (flows the old programs opened since Load).
//  4. FinishUpgrade converts a last time (flows opened during the swap) and removes the old
//     layout's pins and the moved-aside maps.
//
// What is not carried: a flow the old programs open after the pre-swap pass whose first
// packet under the new programs comes before FinishUpgrade's pass is load-balanced anew
// (the new programs cannot see tern_ct); the window is the re-attach loop, milliseconds
// per pod. A flow whose converted wire tuple is already another live flow's (the first
// layout's own collision bug, issue 7) is not converted either.

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Pins of the first layout (loader/testdata/v1) that this layout no longer has.
const (
	v1MapCT     = "tern_ct"
	v1MapRevNAT = "tern_revnat"
)

// v1CTKey and v1CTValue are struct ct_key and struct ct_value of the first layout
// (`git show 4a213e3:bpf/lib/conntrack.h`): one entry per service flow, keyed by what the
// client sent, holding the backend.
type v1CTKey struct {
	Saddr uint32 // client, network order in memory
	Daddr uint32 // frontend
	Sport uint16
	Dport uint16
	Proto uint8
	Pad   [3]uint8
}

type v1CTValue struct {
	ExpiresNs   uint64
	BackendAddr uint32
	BackendPort uint16
	Flags       uint16 // 1 seen reply, 2 closing, 4 hairpin: the same bits as now
	SvcID       uint32
	Pad         uint32
}

const (
	v1CTKeySize   = 16
	v1CTValueSize = 24
)

// movedMap is a pinned map of an older layout that Load renamed out of the way.
type movedMap struct {
	name string // the name it was pinned under
	pin  string // where it is pinned now
}

// oldPinSuffix marks a pin moved aside by Load; FinishUpgrade removes such pins.
var oldPinSuffix = regexp.MustCompile(`_old_[0-9]+$`)

// moveAsideIncompatible renames every pin under root that has the name of one of spec's
// pinned maps but cannot be reused as it (type, key or value size, size, flags), and
// returns them with their handles open, for copying.
func moveAsideIncompatible(spec *ebpf.CollectionSpec, root string, log *zap.Logger) ([]movedMap, []*ebpf.Map, error) {
	var (
		moved []movedMap
		olds  []*ebpf.Map
	)
	now := time.Now().Unix()
	for name, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		path := filepath.Join(root, name)
		if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
			continue
		}
		m, err := ebpf.LoadPinnedMap(path, nil)
		var why string
		switch {
		case err != nil:
			why = fmt.Sprintf("cannot be opened as a map: %v", err)
		default:
			if cerr := ms.Compatible(m); cerr != nil {
				why = cerr.Error()
			} else {
				m.Close()
				continue
			}
		}
		aside := fmt.Sprintf("%s_old_%d", path, now)
		if rerr := movePin(m, path, aside); rerr != nil {
			if m != nil {
				m.Close()
			}
			for _, o := range olds {
				if o != nil {
					o.Close()
				}
			}
			return nil, nil, fmt.Errorf("move pinned map %s (incompatible: %s) aside to %s: %w", path, why, aside, rerr)
		}
		log.Warn("pinned map has an older layout: moved aside; a new one is created and the old one is removed once every pod runs the new programs",
			zap.String("map", name), zap.String("movedTo", aside), zap.String("difference", why))
		moved = append(moved, movedMap{name: name, pin: aside})
		olds = append(olds, m) // nil when it could not be opened
	}
	return moved, olds, nil
}

// movePin pins m (opened from path) at aside as well and then removes path. bpffs refuses
// rename on some kernels, and a second pin followed by an unlink never leaves the map
// without a pin. A pin that is not an openable map (m nil) can only be renamed.
func movePin(m *ebpf.Map, path, aside string) error {
	if m == nil {
		return os.Rename(path, aside)
	}
	// A clone has no pin path of its own, so Pin makes a new pin instead of renaming.
	c, err := m.Clone()
	if err != nil {
		return fmt.Errorf("duplicate map handle: %w", err)
	}
	defer c.Close()
	if err := c.Pin(aside); err != nil {
		return err
	}
	return os.Remove(path)
}

// copyEntries carries the entries of a moved-aside map into its replacement when the two
// differ only in size or flags. Returns how many were copied and how many did not fit.
func copyEntries(old, cur *ebpf.Map) (copied, failed int, err error) {
	if old == nil || old.Type() != cur.Type() || old.KeySize() != cur.KeySize() || old.ValueSize() != cur.ValueSize() {
		return 0, 0, nil
	}
	switch cur.Type() {
	case ebpf.Hash, ebpf.LRUHash, ebpf.Array:
	default:
		// Per-CPU maps (the counters) start over: a counter reset is what a scraper expects
		// from a restarted exporter.
		return 0, 0, nil
	}
	k := make([]byte, old.KeySize())
	v := make([]byte, old.ValueSize())
	it := old.Iterate()
	for it.Next(&k, &v) {
		if err := cur.Put(k, v); err != nil {
			failed++
			continue
		}
		copied++
	}
	return copied, failed, it.Err()
}

// monotonicCoarseNs is the clock the datapath stamps conntrack deadlines with
// (bpf_ktime_get_coarse_ns).
func monotonicCoarseNs() uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC_COARSE, &ts); err != nil {
		// Cannot happen on Linux; fall back to the fine clock, which is never behind.
		_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	}
	return uint64(ts.Nano())
}

// CTFlowKey is the conntrack key of a wire tuple (ct_flow_key in bpf/lib/conntrack.h), for
// tools and tests that look a flow up.
func CTFlowKey(src netip.Addr, sport uint16, dst netip.Addr, dport uint16, proto uint8) CTKey {
	k, _ := flowKey(AddrToBE(src), PortToBE(sport), AddrToBE(dst), PortToBE(dport), proto)
	return k
}

// flowKey is ct_flow_key in bpf/lib/conntrack.h: the wire tuple in canonical order. The
// comparison is on the raw (network order) values as the C code compares them.
func flowKey(saddr uint32, sport uint16, daddr uint32, dport uint16, proto uint8) (CTKey, bool) {
	a := saddr < daddr || (saddr == daddr && sport <= dport)
	k := CTKey{Proto: proto}
	if a {
		k.AddrA, k.PortA, k.AddrB, k.PortB = saddr, sport, daddr, dport
	} else {
		k.AddrA, k.PortA, k.AddrB, k.PortB = daddr, dport, saddr, sport
	}
	return k, a
}

// convertV1 turns a first-layout conntrack entry into the SVC and REVNAT entries svc_open
// (bpf/lib/svc.h) writes for the same flow when it keeps the client's port, with the TCP
// state both halves get from svc_merge. hairpin is the hairpin address (network order).
func convertV1(k v1CTKey, v v1CTValue, hairpin uint32) (sk CTKey, sv CTValue, fk CTKey, fv CTValue) {
	flags := v.Flags & (CTFlagSeenReply | CTFlagClosing | CTFlagHairpin)
	wire := k.Saddr
	if flags&CTFlagHairpin != 0 {
		wire = hairpin
	}
	fk, clientIsA := flowKey(wire, k.Sport, v.BackendAddr, v.BackendPort, k.Proto)
	fv = CTValue{ExpiresNs: v.ExpiresNs, NatAddr: k.Daddr, NatPort: k.Dport, NatSport: k.Sport,
		SvcId: v.SvcID, Flags: flags | CTFlagRevNAT}
	if !clientIsA {
		fv.Flags |= CTFlagOriginB
	}
	sk, svcClientIsA := flowKey(k.Saddr, k.Sport, k.Daddr, k.Dport, k.Proto)
	sv = CTValue{ExpiresNs: v.ExpiresNs, NatAddr: v.BackendAddr, NatPort: v.BackendPort, NatSport: k.Sport,
		SvcId: v.SvcID, Flags: flags | CTFlagSvc}
	if !svcClientIsA {
		sv.Flags |= CTFlagOriginB
	}
	return sk, sv, fk, fv
}

// MigrationStats says what one conversion pass did.
type MigrationStats struct {
	Converted int // live flows written as pairs of entries (or refreshed)
	Expired   int // old entries past their deadline, skipped
	Kept      int // flows the new programs had already opened to another backend, left alone
	Collided  int // wire tuple held by another live flow (the old layout's own collision bug)
	Failed    int // writes that failed (map full)
}

// migrateV1CT converts every live entry of a first-layout tern_ct into ct. A flow already
// in ct with the same backend is refreshed (the later deadline, the union of the TCP
// state); one the new programs opened to another backend is theirs and left alone.
func migrateV1CT(old, ct *ebpf.Map, hairpin uint32) (MigrationStats, error) {
	var (
		st MigrationStats
		k  v1CTKey
		v  v1CTValue
	)
	now := monotonicCoarseNs()
	it := old.Iterate()
	for it.Next(&k, &v) {
		if v.ExpiresNs < now {
			st.Expired++
			continue
		}
		sk, sv, fk, fv := convertV1(k, v, hairpin)
		var cur CTValue
		if err := ct.Lookup(sk, &cur); err == nil && cur.ExpiresNs >= now {
			// Another backend, or a wire port of its own: the new programs opened this flow.
			if cur.NatAddr != sv.NatAddr || cur.NatPort != sv.NatPort || cur.Flags&CTFlagPortSNAT != 0 {
				st.Kept++
				continue
			}
			state := cur.Flags & (CTFlagSeenReply | CTFlagClosing)
			sv.Flags |= state
			fv.Flags |= state
			sv.ExpiresNs = max(sv.ExpiresNs, cur.ExpiresNs)
			fv.ExpiresNs = sv.ExpiresNs
		}
		var other CTValue
		if err := ct.Lookup(fk, &other); err == nil && other.ExpiresNs >= now &&
			!(other.Flags&CTFlagRevNAT != 0 && other.NatAddr == fv.NatAddr && other.NatPort == fv.NatPort && other.NatSport == fv.NatSport) {
			st.Collided++
			continue
		}
		// FLOW first, as svc_open writes it, so a reply never finds a half-made flow.
		if err := ct.Put(fk, fv); err != nil {
			st.Failed++
			continue
		}
		if err := ct.Put(sk, sv); err != nil {
			st.Failed++
			continue
		}
		st.Converted++
	}
	if err := it.Err(); err != nil {
		return st, fmt.Errorf("iterate first-layout conntrack map %s: %w", v1MapCT, err)
	}
	return st, nil
}

// openV1CT opens the first layout's pinned conntrack map, if the pin root has one.
func openV1CT(root string) (*ebpf.Map, error) {
	path := filepath.Join(root, v1MapCT)
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open first-layout conntrack map %s: %w", path, err)
	}
	if m.Type() != ebpf.LRUHash || m.KeySize() != v1CTKeySize || m.ValueSize() != v1CTValueSize {
		m.Close()
		return nil, fmt.Errorf("pinned %s is %s with key %d and value %d bytes, not the first layout's conntrack (LRU hash, 16, 24)",
			path, m.Type(), m.KeySize(), m.ValueSize())
	}
	return m, nil
}

// upgradeOnLoad runs the parts of an upgrade that need no program swap: it copies the
// moved-aside maps' entries and converts the first layout's flows. Errors are logged, not
// returned: a flow that cannot be converted is load-balanced again, which is what an
// agent without an upgrade path would do to every flow.
func (d *Datapath) upgradeOnLoad(olds []*ebpf.Map) {
	log := d.cfg.Logger
	cur := map[string]*ebpf.Map{
		PodMapTernServices: d.objs.TernServices, PodMapTernBackends: d.objs.TernBackends,
		PodMapTernLbMembers: d.objs.TernLbMembers, PodMapTernConntrack: d.objs.TernConntrack,
		PodMapTernFrags: d.objs.TernFrags, PodMapTernMetrics: d.objs.TernMetrics,
	}
	for i, mv := range d.moved {
		old := olds[i]
		if old == nil {
			continue
		}
		if m, ok := cur[mv.name]; ok {
			n, failed, err := copyEntries(old, m)
			log.Info("copied entries of a moved-aside map", zap.String("map", mv.name), zap.Int("copied", n),
				zap.Int("didNotFit", failed), zap.Error(err))
		}
		old.Close()
	}
	v1, err := openV1CT(d.cfg.PinRoot)
	if err != nil {
		log.Error("first-layout conntrack map left alone: its flows will be load-balanced again", zap.Error(err))
		return
	}
	if v1 == nil {
		return
	}
	d.v1CT = v1
	d.migrate("load")
}

func (d *Datapath) migrate(pass string) {
	st, err := migrateV1CT(d.v1CT, d.objs.TernConntrack, AddrToBE(d.cfg.HairpinIP))
	d.cfg.Logger.Info("converted first-layout conntrack entries", zap.String("pass", pass),
		zap.Int("converted", st.Converted), zap.Int("expired", st.Expired), zap.Int("keptNew", st.Kept),
		zap.Int("collided", st.Collided), zap.Int("failed", st.Failed), zap.Error(err))
	d.lastMigration = st
}

// LastMigration is what the latest conversion of first-layout flows did (zero when the pin
// root had none).
func (d *Datapath) LastMigration() MigrationStats { return d.lastMigration }

// FinishUpgrade completes an upgrade once every pod runs this datapath's programs (after
// ReattachPods): it converts the first layout's flows again, catching those the old
// programs opened or refreshed since Load, then removes the old layout's pins and the maps
// Load moved aside. Without an upgrade in progress it only sweeps leftover moved-aside
// pins. Call it in the pin root's owner (the agent), never while a pod still runs old
// programs that you want migrated later.
func (d *Datapath) FinishUpgrade() error {
	var errs []error
	if d.v1CT != nil {
		d.migrate("finish")
		d.v1CT.Close()
		d.v1CT = nil
	}
	for _, name := range []string{v1MapCT, v1MapRevNAT} {
		path := filepath.Join(d.cfg.PinRoot, name)
		if err := os.Remove(path); err == nil {
			d.cfg.Logger.Info("removed first-layout pin", zap.String("pin", path))
		} else if !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove first-layout pin %s: %w", path, err))
		}
	}
	entries, err := os.ReadDir(d.cfg.PinRoot)
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("list pin root %s: %w", d.cfg.PinRoot, err))...)
	}
	for _, e := range entries {
		if !oldPinSuffix.MatchString(e.Name()) {
			continue
		}
		path := filepath.Join(d.cfg.PinRoot, e.Name())
		if err := os.Remove(path); err != nil {
			errs = append(errs, fmt.Errorf("remove moved-aside pin %s: %w", path, err))
			continue
		}
		d.cfg.Logger.Info("removed moved-aside map pin", zap.String("pin", path))
	}
	d.moved = nil
	return errors.Join(errs...)
}

// ReattachPods swaps this datapath's programs onto every interface that has tern programs
// attached (by any earlier agent): the tcx links pinned under the pin root are updated in
// place, clsact filters at tern's handle and priority are replaced in place. Neither leaves
// a moment without a program. Run it in the network namespace of the pod veths, before
// FinishUpgrade and after the service reconciler has rebuilt the membership index from the
// maps (lbmap.NewReconciler), or established UDP flows would be load-balanced again.
// Returns the interfaces it re-attached.
func (d *Datapath) ReattachPods() ([]int, error) {
	var (
		done []int
		errs []error
	)
	// Flows the old programs opened since Load (the agent starts its pool and components in
	// between, seconds) are converted right before the swap, so only those opened during
	// the swap itself are left for FinishUpgrade's pass.
	if d.v1CT != nil {
		d.migrate("before swap")
	}
	seen := map[int]bool{}
	entries, err := os.ReadDir(filepath.Join(d.cfg.PinRoot, "links"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("list tcx link pins under %s: %w", d.cfg.PinRoot, err)
	}
	for _, e := range entries {
		ifindex, ok := parseLinkPin(e.Name())
		if !ok || seen[ifindex] {
			continue
		}
		seen[ifindex] = true
		if _, err := netlink.LinkByIndex(ifindex); err != nil {
			// The veth went with its pod; DetachPod clears what is left of its pins.
			if derr := d.DetachPod(ifindex); derr != nil {
				errs = append(errs, derr)
			}
			continue
		}
		if err := d.attachTCX(d.podHooks(), ifindex); err != nil {
			errs = append(errs, fmt.Errorf("re-attach tcx programs to ifindex %d: %w", ifindex, err))
			continue
		}
		done = append(done, ifindex)
	}
	links, err := netlink.LinkList()
	if err != nil {
		return done, errors.Join(append(errs, fmt.Errorf("list interfaces to find clsact attachments: %w", err))...)
	}
	for _, l := range links {
		ifindex := l.Attrs().Index
		if seen[ifindex] || !hasTernClsact(ifindex) {
			continue
		}
		seen[ifindex] = true
		if err := d.attachClsact(d.podHooks(), ifindex); err != nil {
			errs = append(errs, fmt.Errorf("re-attach clsact programs to %s: %w", l.Attrs().Name, err))
			continue
		}
		done = append(done, ifindex)
	}
	d.cfg.Logger.Info("re-attached pod programs", zap.Int("interfaces", len(done)), zap.Int("failed", len(errs)))
	return done, errors.Join(errs...)
}

// parseLinkPin reads the ifindex out of a pod link pin name (if<N>_ingress, if<N>_egress).
// The netdev programs' pins (netdev_if<N>_...) do not parse: ReattachPods must never put
// pod programs on an ENI.
func parseLinkPin(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, "if")
	if !ok {
		return 0, false
	}
	num, dir, ok := strings.Cut(rest, "_")
	if !ok || (dir != "ingress" && dir != "egress") {
		return 0, false
	}
	n, err := strconv.Atoi(num)
	return n, err == nil && n > 0
}

// hasTernClsact tells whether an interface has a tern pod program as a clsact filter. The
// netdev programs (tern_*_netdev) are not pod programs.
func hasTernClsact(ifindex int) bool {
	lk := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := netlink.FilterList(lk, parent)
		if err != nil {
			continue
		}
		for _, f := range fs {
			bf, ok := f.(*netlink.BpfFilter)
			if ok && bf.Handle == clsactHandle && bf.Priority == clsactPrio && strings.HasPrefix(bf.Name, "tern_") &&
				!strings.HasSuffix(bf.Name, "_netdev") {
				return true
			}
		}
	}
	return false
}
