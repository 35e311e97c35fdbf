package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
)

// The netdev object (bpf/netdev.c): programs on the node's ENI links and its primary NIC.
// They masquerade pod traffic leaving the VPC (bpf/lib/snat.h) and pass and count the rest
// under from-netdev / to-netdev; the NodePort stages will go into them.

// loadNetdev loads the netdev programs with the pin options of the pod object, after it,
// so every map they share is already pinned and is reused. vars and sizes are the pod
// object's: a shared map must have the same size in both.
func loadNetdev(objs *NetdevObjects, opts *ebpf.CollectionOptions, vars map[string]any, sizes map[string]uint32) error {
	spec, err := LoadNetdev()
	if err != nil {
		return fmt.Errorf("parse embedded netdev BPF object: %w", err)
	}
	if err := configureSpec(spec, vars, sizes); err != nil {
		return err
	}
	if err := spec.LoadAndAssign(objs, opts); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return fmt.Errorf("kernel verifier rejected the netdev programs: %+v", ve)
		}
		return fmt.Errorf("load netdev programs (pin root %s): %w", opts.Maps.PinPath, err)
	}
	return nil
}

func (d *Datapath) netdevHooks() hookPrograms {
	return hookPrograms{ingress: d.netdev.TernFromNetdev, egress: d.netdev.TernToNetdev,
		ingressName: NetdevProgTernFromNetdev, egressName: NetdevProgTernToNetdev, pinPrefix: "netdev_",
		prio: NetdevClsactPriority, legacyPrio: clsactPrio}
}

// FromNetdev and ToNetdev are the programs for an ENI link or the primary NIC.
func (d *Datapath) FromNetdev() *ebpf.Program { return d.netdev.TernFromNetdev }
func (d *Datapath) ToNetdev() *ebpf.Program   { return d.netdev.TernToNetdev }

// AttachNetdev attaches the netdev programs to an ENI link or the primary NIC:
// tern_from_netdev on ingress, tern_to_netdev on egress, with tcx (links pinned as
// links/netdev_if<N>_<dir>) or clsact where tcx is missing. Like AttachPod it runs in the
// interface's network namespace and replaces the programs atomically when called again.
//
// The interface is also recorded in tern_netdevs, the devices the pod programs' forward
// stage may redirect out of.
func (d *Datapath) AttachNetdev(ifindex int) (AttachMode, error) {
	mode, err := d.attach(d.netdevHooks(), ifindex)
	if err != nil {
		return mode, err
	}
	return mode, d.markNetdev(ifindex, true)
}

// DetachNetdev removes the netdev programs from an interface; a missing interface or
// attachment is not an error. The interface leaves tern_netdevs first, so nothing is
// redirected to it once its programs are gone.
func (d *Datapath) DetachNetdev(ifindex int) error {
	return errors.Join(d.markNetdev(ifindex, false), d.detach(d.netdevHooks(), ifindex))
}

// NetdevAttached tells whether the netdev programs are on an interface: a live tcx link
// pin, or a clsact filter of theirs.
func (d *Datapath) NetdevAttached(ifindex int) bool {
	h := d.netdevHooks()
	if l, err := link.LoadPinnedLink(d.linkPin(h, ifindex, "ingress"), nil); err == nil {
		info, ierr := l.Info()
		l.Close()
		if ierr == nil {
			if tcx := info.TCX(); tcx != nil && int(tcx.Ifindex) == ifindex {
				return true
			}
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return false
	}
	lk := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}
	fs, err := netlink.FilterList(lk, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		return false
	}
	for _, f := range fs {
		if bf, ok := f.(*netlink.BpfFilter); ok && bf.Handle == clsactHandle && bf.Priority == h.prio &&
			bf.Name == h.ingressName {
			return true
		}
	}
	return false
}

// NetdevPinned lists the interfaces that have netdev tcx link pins, so an agent can clear
// the pins of ENIs that left the instance (the link went, the pin stayed).
func (d *Datapath) NetdevPinned() ([]int, error) {
	entries, err := os.ReadDir(filepath.Join(d.cfg.PinRoot, "links"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("list link pins under %s: %w", d.cfg.PinRoot, err)
	}
	var out []int
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), d.netdevHooks().pinPrefix)
		if !ok {
			continue
		}
		ifindex, ok := parseLinkPin(rest)
		if ok && strings.HasSuffix(rest, "_ingress") {
			out = append(out, ifindex)
		}
	}
	return out, nil
}
