package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/tern-net/tern/loader"
)

// Trunk is the node's half of ENI trunking (bpf/lib/trunk.h): a pod on a member ENI is wired
// like any pod (veth, /32, "to podIP → main", "from podIP → the trunk ENI's table"), and two
// programs on the trunk ENI's link tag its packets with the member's VLAN id on the way out
// and untag its VLAN's frames on the way in. This kernel has no VLAN devices and no act_vlan,
// so the tag is pushed and popped with BPF helpers. The programs run first in the link's tcx
// chains (link.Head), before the netdev programs, which therefore see plain IPv4.
//
// Known limit: a trunk pod's traffic that the netdev programs masquerade out of the primary
// NIC (a destination outside the VPC) keeps its tag; trunk pods need the VPC's NAT gateway
// (masquerade off for them) until the masquerade stage learns to drop the tag.
type Trunk struct {
	objs    loader.TrunkObjects
	pinRoot string              // "" keeps maps and links in this process only (tests)
	links   map[int][]link.Link // unpinned links by ifindex
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
// link's network namespace (tcx resolves the ifindex there). Attaching again replaces the
// pinned links' programs in place.
func (t *Trunk) Attach(ifindex int) error {
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

// Detach removes the trunk programs from a link; what is not there is not an error.
func (t *Trunk) Detach(ifindex int) error {
	var errs []error
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

// ProbeTCX tells whether the kernel has tcx (Linux ≥ 6.6), which the trunk programs need: they
// must run first on the trunk link, before the netdev programs, and the clsact fallback is not
// done for them. It asks the kernel to attach to an interface index no device has: a kernel
// with tcx answers "no such device", one without it ErrNotSupported. Nothing is attached.
func (t *Trunk) ProbeTCX() error {
	const noSuchIfindex = 0x7ffffff0
	l, err := link.AttachTCX(link.TCXOptions{Interface: noSuchIfindex, Program: t.objs.TernTrunkEgress, Attach: ebpf.AttachTCXEgress})
	if err == nil {
		l.Close()
		return nil
	}
	if errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("ENI trunking needs tcx (Linux 6.6 or newer) to run the VLAN programs first on the trunk ENI's link; this kernel has none: %w", err)
	}
	return nil
}
