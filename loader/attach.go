package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// AttachMode is how programs are attached to an interface.
type AttachMode string

const (
	AttachTCX    AttachMode = "tcx"
	AttachClsact AttachMode = "clsact"
)

// Filter identity for the clsact fallback: one filter per direction, replaced in place on
// re-attach so there is never a moment without a program.
const (
	clsactPrio   = 1
	clsactHandle = 1
)

// Priorities of the clsact fallback on a device that carries more than one object's programs.
// cls_bpf runs a device's filters by priority, lowest first, and a direct-action program's
// TC_ACT_UNSPEC goes on to the next one, as TCX_NEXT does under tcx. A trunk ENI's link has
// the trunk programs (datapath.Trunk: they tag and untag member pods' VLANs) and the netdev
// programs, and the VLAN ones must run first: the netdev programs end their chain with
// TC_ACT_OK, after which nothing runs. So the netdev programs take priority 2 and the trunk
// programs 1 (the lowest a filter can ask for: 0 lets the kernel choose). The pod programs,
// alone on their veths, keep 1.
const (
	TrunkClsactPriority  = 1
	NetdevClsactPriority = 2
)

// hookPrograms is one object's pair of tc programs and how their tcx links are pinned.
type hookPrograms struct {
	ingress, egress         *ebpf.Program
	ingressName, egressName string // clsact filter names: the programs' names
	// pinPrefix starts the link pin names under links/: "" for the pod programs (if<N>_<dir>,
	// what ReattachPods parses), "netdev_" for the netdev programs.
	pinPrefix string
	// prio is the clsact filter priority; legacyPrio, when set, a priority these programs'
	// filters had before, removed (only filters of these programs' names) once the new ones
	// are in place, so an upgraded node does not run them twice or ahead of another object.
	prio, legacyPrio uint16
}

func (d *Datapath) podHooks() hookPrograms {
	return hookPrograms{ingress: d.objs.TernFromPod, egress: d.objs.TernToPod,
		ingressName: PodProgTernFromPod, egressName: PodProgTernToPod, prio: clsactPrio}
}

func (d *Datapath) linkPin(h hookPrograms, ifindex int, dir string) string {
	return filepath.Join(d.cfg.PinRoot, "links", fmt.Sprintf("%sif%d_%s", h.pinPrefix, ifindex, dir))
}

// AttachPod attaches the pod programs to the host side of a pod veth: tern_from_pod on
// ingress, tern_to_pod on egress. It must run in the network namespace that holds the
// interface (tcx and netlink resolve ifindex in the calling thread's namespace). Calling it
// again, for instance from a restarted agent, atomically replaces the programs.
func (d *Datapath) AttachPod(ifindex int) (AttachMode, error) {
	return d.attach(d.podHooks(), ifindex)
}

func (d *Datapath) attach(h hookPrograms, ifindex int) (AttachMode, error) {
	if !d.cfg.ForceClsact {
		err := d.attachTCX(h, ifindex)
		if err == nil {
			return AttachTCX, nil
		}
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return "", err
		}
		d.cfg.Logger.Info("tcx not supported by this kernel, falling back to clsact", zap.Int("ifindex", ifindex))
	}
	return AttachClsact, d.attachClsact(h, ifindex)
}

func (d *Datapath) attachTCX(h hookPrograms, ifindex int) error {
	for _, a := range []struct {
		dir  string
		prog *ebpf.Program
		at   ebpf.AttachType
	}{{"ingress", h.ingress, ebpf.AttachTCXIngress}, {"egress", h.egress, ebpf.AttachTCXEgress}} {
		pin := d.linkPin(h, ifindex, a.dir)
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			// Re-attach after a restart: swap the program under the existing link.
			err = l.Update(a.prog)
			l.Close()
			if err == nil {
				continue
			}
			// The interface behind the pin is gone (index reused or link defunct): start over.
			os.Remove(pin)
		}
		l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: a.prog, Attach: a.at})
		if err != nil {
			return fmt.Errorf("attach %s program to ifindex %d with tcx: %w", a.dir, ifindex, err)
		}
		if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
			l.Close()
			return fmt.Errorf("create link pin directory: %w", err)
		}
		if err := l.Pin(pin); err != nil {
			l.Close()
			return fmt.Errorf("pin tcx link %s: %w", pin, err)
		}
		l.Close()
	}
	return nil
}

func (d *Datapath) attachClsact(h hookPrograms, ifindex int) error {
	lk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return fmt.Errorf("find interface %d for clsact attach: %w", ifindex, err)
	}
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: ifindex,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
	if err := netlink.QdiscReplace(qdisc); err != nil {
		return fmt.Errorf("add clsact qdisc to %s: %w", lk.Attrs().Name, err)
	}
	for _, a := range []struct {
		parent uint32
		prog   *ebpf.Program
		name   string
	}{{netlink.HANDLE_MIN_INGRESS, h.ingress, h.ingressName}, {netlink.HANDLE_MIN_EGRESS, h.egress, h.egressName}} {
		f := &netlink.BpfFilter{
			FilterAttrs: netlink.FilterAttrs{
				LinkIndex: ifindex,
				Parent:    a.parent,
				Handle:    clsactHandle,
				Priority:  h.prio,
				Protocol:  unix.ETH_P_ALL,
			},
			Fd:           a.prog.FD(),
			Name:         a.name,
			DirectAction: true,
		}
		if err := netlink.FilterReplace(f); err != nil {
			return fmt.Errorf("attach %s to %s with clsact: %w", a.name, lk.Attrs().Name, err)
		}
	}
	return d.removeLegacyClsact(h, ifindex)
}

// removeLegacyClsact deletes the filters of h's programs at h.legacyPrio, recognised by
// their names: another object's filter there (the trunk programs') stays.
func (d *Datapath) removeLegacyClsact(h hookPrograms, ifindex int) error {
	if h.legacyPrio == 0 {
		return nil
	}
	lk := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}
	var errs []error
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := netlink.FilterList(lk, parent)
		if err != nil {
			continue // no clsact qdisc, or the device is gone: nothing left over
		}
		for _, f := range fs {
			bf, ok := f.(*netlink.BpfFilter)
			if !ok || bf.Priority != h.legacyPrio || (bf.Name != h.ingressName && bf.Name != h.egressName) {
				continue
			}
			if err := netlink.FilterDel(bf); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) {
				errs = append(errs, fmt.Errorf("remove %s's clsact filter of priority %d from ifindex %d: %w", bf.Name, bf.Priority, ifindex, err))
			}
		}
	}
	return errors.Join(errs...)
}

// DetachPod removes the pod programs from an interface, whichever way they were attached.
// A missing interface or attachment is not an error: a deleted veth takes its programs
// with it. Run it in the interface's network namespace.
func (d *Datapath) DetachPod(ifindex int) error {
	return d.detach(d.podHooks(), ifindex)
}

func (d *Datapath) detach(h hookPrograms, ifindex int) error {
	var errs []error
	for _, dir := range []string{"ingress", "egress"} {
		pin := d.linkPin(h, ifindex, dir)
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				os.Remove(pin)
			}
			continue
		}
		if err := l.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin %s: %w", pin, err))
		}
		l.Close()
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		f := &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex, Parent: parent, Handle: clsactHandle, Priority: h.prio, Protocol: unix.ETH_P_ALL,
		}}
		if err := netlink.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("remove clsact filter from ifindex %d: %w", ifindex, err))
		}
	}
	errs = append(errs, d.removeLegacyClsact(h, ifindex))
	return errors.Join(errs...)
}
