package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/loader"
)

// Trunk is the node's half of ENI trunking (bpf/lib/trunk.h): a pod on a member ENI is wired
// like any pod (veth, /32, "to podIP → main", "from podIP → the trunk ENI's table"), and two
// programs on the trunk ENI's link tag its packets with the member's VLAN id on the way out
// and untag its VLAN's frames on the way in. This kernel has no VLAN devices and no act_vlan,
// so the tag is pushed and popped with BPF helpers. The programs run first on the link, before
// the netdev programs (which therefore see plain IPv4, and drop the tag of a packet they
// translate: bpf/netdev.c): first in its tcx chains (link.Head), or, on a kernel without tcx,
// as clsact filters of a lower priority than the netdev programs' (loader.TrunkClsactPriority).
type Trunk struct {
	objs    loader.TrunkObjects
	pinRoot string              // "" keeps maps and links in this process only (tests)
	links   map[int][]link.Link // unpinned links by ifindex
	mode    loader.AttachMode   // AttachTCX (the default) or AttachClsact
}

// SetAttachMode chooses how Attach puts the programs on a link: loader.AttachTCX (the
// default; Linux ≥ 6.6) or loader.AttachClsact (older kernels, or an agent with forceClsact).
func (t *Trunk) SetAttachMode(m loader.AttachMode) { t.mode = m }

// AttachMode is how Attach puts the programs on a link.
func (t *Trunk) AttachMode() loader.AttachMode {
	if t.mode == "" {
		return loader.AttachTCX
	}
	return t.mode
}

// TrunkStats are the trunk programs' counters (tern_trunk_stats), summed over CPUs.
type TrunkStats struct {
	Tagged, Untagged, DropUnknownVLAN, DropWrongDst, DropPush uint64
}

// LoadTrunk loads the trunk programs. With pinRoot, their maps are pinned there by name
// (tern_trunk_vlans, tern_trunk_pods, tern_trunk_stats) and reused across restarts, and the
// tcx links are pinned as links/trunk_if<N>_<dir>, so the tagging survives the agent.
func LoadTrunk(pinRoot string) (*Trunk, error) {
	t := &Trunk{pinRoot: pinRoot, links: map[int][]link.Link{}}
	opts := &ebpf.CollectionOptions{}
	if pinRoot != "" {
		if err := os.MkdirAll(filepath.Join(pinRoot, "links"), 0o755); err != nil {
			return nil, fmt.Errorf("create the trunk pin directory under %s: %w", pinRoot, err)
		}
		opts.Maps.PinPath = pinRoot
	}
	spec, err := loader.LoadTrunk()
	if err != nil {
		return nil, fmt.Errorf("parse the embedded trunk BPF object: %w", err)
	}
	if pinRoot == "" {
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone
		}
	}
	if err := spec.LoadAndAssign(&t.objs, opts); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("kernel verifier rejected the trunk programs: %+v", ve)
		}
		return nil, fmt.Errorf("load the trunk programs (pin root %q): %w", pinRoot, err)
	}
	return t, nil
}

func (t *Trunk) linkPin(ifindex int, dir string) string {
	return filepath.Join(t.pinRoot, "links", fmt.Sprintf("trunk_if%d_%s", ifindex, dir))
}

// Attach puts the trunk programs first on the trunk ENI's link. Call it from a thread in the
// link's network namespace (tcx and netlink resolve the ifindex there). Attaching again
// replaces the programs in place (the pinned tcx links' programs, or the clsact filters).
func (t *Trunk) Attach(ifindex int) error {
	if t.AttachMode() == loader.AttachClsact {
		return t.attachClsact(ifindex)
	}
	if _, ok := t.links[ifindex]; ok && t.pinRoot == "" {
		return nil // already first in both chains; a second pair would tag twice
	}
	hooks := []struct {
		dir    string
		prog   *ebpf.Program
		attach ebpf.AttachType
	}{{"egress", t.objs.TernTrunkEgress, ebpf.AttachTCXEgress}, {"ingress", t.objs.TernTrunkIngress, ebpf.AttachTCXIngress}}
	var made []link.Link
	for _, h := range hooks {
		if t.pinRoot != "" {
			if l, err := link.LoadPinnedLink(t.linkPin(ifindex, h.dir), nil); err == nil {
				err = l.Update(h.prog)
				l.Close()
				if err == nil {
					continue
				}
				_ = os.Remove(t.linkPin(ifindex, h.dir)) // a stale pin (its device is gone)
			}
		}
		l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: h.prog, Attach: h.attach, Anchor: link.Head()})
		if err != nil {
			for _, m := range made {
				m.Close()
			}
			return fmt.Errorf("attach trunk program %s to ifindex %d (tcx, needs Linux 6.6+): %w", h.dir, ifindex, err)
		}
		if t.pinRoot != "" {
			if err := l.Pin(t.linkPin(ifindex, h.dir)); err != nil {
				l.Close()
				return fmt.Errorf("pin trunk link %s of ifindex %d: %w", h.dir, ifindex, err)
			}
			l.Close()
			continue
		}
		made = append(made, l)
	}
	t.links[ifindex] = append(t.links[ifindex], made...)
	return nil
}

// trunkClsactHandle tells the trunk programs' clsact filters from the netdev programs' (which
// have priority loader.NetdevClsactPriority, and had 1 with handle 1 before it, which an
// upgraded node still shows until the netdev attach removes it).
const trunkClsactHandle = 0x7e

func (t *Trunk) clsactFilter(ifindex int, parent uint32) *netlink.BpfFilter {
	return &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: ifindex, Parent: parent,
		Handle: trunkClsactHandle, Priority: loader.TrunkClsactPriority, Protocol: unix.ETH_P_ALL}, DirectAction: true}
}

// attachClsact is Attach without tcx: a clsact qdisc on the link and one cls_bpf filter per
// direction at loader.TrunkClsactPriority, below the netdev programs' priority, so the kernel
// runs the VLAN programs first; their TC_ACT_UNSPEC goes on to the netdev programs. Filters
// live with the device (no pins): a restarted agent replaces them in place.
func (t *Trunk) attachClsact(ifindex int) error {
	lk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return fmt.Errorf("find trunk link %d for the clsact attach: %w", ifindex, err)
	}
	q := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0),
		Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
	if err := netlink.QdiscReplace(q); err != nil {
		return fmt.Errorf("add a clsact qdisc to trunk link %s: %w", lk.Attrs().Name, err)
	}
	for _, h := range []struct {
		parent uint32
		prog   *ebpf.Program
		name   string
	}{{netlink.HANDLE_MIN_EGRESS, t.objs.TernTrunkEgress, "tern_trunk_egress"}, {netlink.HANDLE_MIN_INGRESS, t.objs.TernTrunkIngress, "tern_trunk_ingress"}} {
		f := t.clsactFilter(ifindex, h.parent)
		f.Fd, f.Name = h.prog.FD(), h.name
		if err := netlink.FilterReplace(f); err != nil {
			return fmt.Errorf("attach trunk program %s to %s with clsact (priority %d): %w", h.name, lk.Attrs().Name, loader.TrunkClsactPriority, err)
		}
	}
	return nil
}

// Detach removes the trunk programs from a link; what is not there is not an error.
func (t *Trunk) Detach(ifindex int) error {
	var errs []error
	for _, parent := range []uint32{netlink.HANDLE_MIN_EGRESS, netlink.HANDLE_MIN_INGRESS} {
		if err := netlink.FilterDel(t.clsactFilter(ifindex, parent)); err != nil && !errors.Is(err, unix.ENOENT) &&
			!errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("remove the trunk's clsact filter from ifindex %d: %w", ifindex, err))
		}
	}
	for _, l := range t.links[ifindex] {
		errs = append(errs, l.Close())
	}
	delete(t.links, ifindex)
	if t.pinRoot != "" {
		for _, dir := range []string{"egress", "ingress"} {
			p := t.linkPin(ifindex, dir)
			if l, err := link.LoadPinnedLink(p, nil); err == nil {
				errs = append(errs, l.Unpin(), l.Close())
			} else if _, serr := os.Stat(p); serr == nil {
				errs = append(errs, os.Remove(p))
			}
		}
	}
	return errors.Join(errs...)
}

func addrKey(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24 // network order in memory
}

// AddPod makes pod's traffic on the trunk link trunkIfindex carry VLAN vlan, and that VLAN's
// frames reach pod.
func (t *Trunk) AddPod(pod netip.Addr, trunkIfindex, vlan int) error {
	if !pod.Is4() || vlan < 1 || vlan > 4094 {
		return fmt.Errorf("trunk pod %s VLAN %d: want an IPv4 address and a VLAN id in 1..4094", pod, vlan)
	}
	k := addrKey(pod)
	if err := t.objs.TernTrunkVlans.Put(k, loader.TrunkTrunkVlan{Ifindex: uint32(trunkIfindex), Vid: uint16(vlan)}); err != nil {
		return fmt.Errorf("tag %s with VLAN %d on ifindex %d: %w", pod, vlan, trunkIfindex, err)
	}
	if err := t.objs.TernTrunkPods.Put(loader.TrunkTrunkKey{Ifindex: uint32(trunkIfindex), Vid: uint32(vlan)}, k); err != nil {
		return fmt.Errorf("deliver VLAN %d of ifindex %d to %s: %w", vlan, trunkIfindex, pod, err)
	}
	return nil
}

// DelPod undoes AddPod; entries already gone are not an error.
func (t *Trunk) DelPod(pod netip.Addr, trunkIfindex, vlan int) error {
	var errs []error
	if err := t.objs.TernTrunkVlans.Delete(addrKey(pod)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, fmt.Errorf("untag %s: %w", pod, err))
	}
	if err := t.objs.TernTrunkPods.Delete(loader.TrunkTrunkKey{Ifindex: uint32(trunkIfindex), Vid: uint32(vlan)}); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, fmt.Errorf("forget VLAN %d of ifindex %d: %w", vlan, trunkIfindex, err))
	}
	return errors.Join(errs...)
}

// Stats sums tern_trunk_stats over CPUs.
func (t *Trunk) Stats() (TrunkStats, error) {
	var out TrunkStats
	dst := []*uint64{&out.Tagged, &out.Untagged, &out.DropUnknownVLAN, &out.DropWrongDst, &out.DropPush}
	for i, d := range dst {
		var per []uint64
		if err := t.objs.TernTrunkStats.Lookup(uint32(i), &per); err != nil {
			return out, fmt.Errorf("read tern_trunk_stats[%d]: %w", i, err)
		}
		for _, v := range per {
			*d += v
		}
	}
	return out, nil
}

// Close releases the programs and the unpinned links (which detaches them); pinned links and
// maps stay for the next agent.
func (t *Trunk) Close() error {
	var errs []error
	for idx, ls := range t.links {
		for _, l := range ls {
			errs = append(errs, l.Close())
		}
		delete(t.links, idx)
	}
	errs = append(errs, t.objs.Close())
	return errors.Join(errs...)
}

// ProbeTCX tells whether the kernel has tcx (Linux ≥ 6.6); without it the agent attaches the
// trunk programs with clsact (SetAttachMode). It asks the kernel to attach to an interface index no device has: a kernel
// with tcx answers "no such device", one without it ErrNotSupported. Nothing is attached.
func (t *Trunk) ProbeTCX() error {
	const noSuchIfindex = 0x7ffffff0
	l, err := link.AttachTCX(link.TCXOptions{Interface: noSuchIfindex, Program: t.objs.TernTrunkEgress, Attach: ebpf.AttachTCXEgress})
	if err == nil {
		l.Close()
		return nil
	}
	if errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("this kernel has no tcx (Linux 6.6 or newer): %w", err)
	}
	return nil
}
