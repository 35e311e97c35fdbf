package bandwidth

import (
	"errors"
	"fmt"
	"runtime"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Mode is how pod egress is limited on a node.
type Mode string

const (
	// ModeEDT sets each packet's departure time; fq on the device it leaves by holds it.
	ModeEDT Mode = "edt"
	// ModePolicer drops what exceeds a token bucket (kernels without fq).
	ModePolicer Mode = "policer"
)

// ParseMode reads the agent's bandwidthMode setting: "auto" (or empty) probes, "edt" and
// "policer" force a mode.
func ParseMode(s string) (mode Mode, auto bool, err error) {
	switch s {
	case "", "auto":
		return "", true, nil
	case string(ModeEDT), string(ModePolicer):
		return Mode(s), false, nil
	}
	return "", false, fmt.Errorf("bandwidthMode %q: want auto, edt or policer", s)
}

// ProbeFQ tells whether the kernel has the fq qdisc, by adding one to the loopback of a
// throwaway network namespace (the node's devices are not touched). ok false with a nil
// error means the kernel said no; an error means the probe itself could not run.
func ProbeFQ() (ok bool, err error) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		// The thread changes namespace and is never returned to the pool: Go discards a
		// thread that exits locked.
		runtime.LockOSThread()
		var ns netns.NsHandle
		if ns, err = netns.New(); err != nil {
			err = fmt.Errorf("probe for fq: create a network namespace: %w", err)
			return
		}
		defer ns.Close()
		lo, lerr := netlink.LinkByName("lo")
		if lerr != nil {
			err = fmt.Errorf("probe for fq: find lo in the probe namespace: %w", lerr)
			return
		}
		qerr := netlink.QdiscAdd(fq(lo.Attrs().Index, netlink.HANDLE_ROOT, netlink.MakeHandle(1, 0)))
		switch {
		case qerr == nil:
			ok = true
		case errors.Is(qerr, unix.ENOENT), errors.Is(qerr, unix.EOPNOTSUPP), errors.Is(qerr, unix.EINVAL):
			ok = false // "Unknown qdisc": not built, no module
		default:
			err = fmt.Errorf("probe for fq: add fq to lo: %w", qerr)
		}
	}()
	<-done
	return ok, err
}

func fq(ifindex int, parent, handle uint32) *netlink.Fq {
	q := netlink.NewFq(netlink.QdiscAttrs{LinkIndex: ifindex, Parent: parent, Handle: handle})
	// fq's own horizon (10 s by default) must be above the programs' (up to MaxHorizon), so
	// that fq never drops what they let through: they drop first and count it. In µs.
	q.Horizon = uint32((MaxHorizon + time.Second) / time.Microsecond)
	return q
}

// EnsureFQ makes fq the root qdisc of the device pod traffic leaves the node by (the
// primary NIC, an ENI), as EDT needs: fq releases each packet at its departure time. A
// multi-queue device keeps its per-queue parallelism with mq at the root and fq under each
// queue, as Cilium's bandwidth manager does. It replaces whatever was there and is
// idempotent.
func EnsureFQ(ifindex int) error {
	link, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return fmt.Errorf("set fq on ifindex %d: %w", ifindex, err)
	}
	name := link.Attrs().Name
	qs, err := netlink.QdiscList(link)
	if err != nil {
		return fmt.Errorf("set fq on %s: list qdiscs: %w", name, err)
	}
	queues := link.Attrs().NumTxQueues
	if queues <= 1 {
		// Replace even an fq that is there: its horizon must be ours.
		if err := netlink.QdiscReplace(fq(ifindex, netlink.HANDLE_ROOT, netlink.MakeHandle(1, 0))); err != nil {
			return fmt.Errorf("set fq as the root qdisc of %s (EDT needs it; set bandwidthMode: policer to run without): %w", name, err)
		}
		return nil
	}
	const major = 0x7e00 // tern's handle for the mq root
	hasMQ := false
	for _, q := range qs {
		if q.Attrs().Parent == netlink.HANDLE_ROOT && q.Type() == "mq" && q.Attrs().Handle == netlink.MakeHandle(major, 0) {
			hasMQ = true
		}
	}
	if !hasMQ {
		mq := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Parent: netlink.HANDLE_ROOT,
			Handle: netlink.MakeHandle(major, 0)}, QdiscType: "mq"}
		if err := netlink.QdiscReplace(mq); err != nil {
			return fmt.Errorf("set mq as the root qdisc of %s: %w", name, err)
		}
	}
	for i := 1; i <= queues; i++ {
		if err := netlink.QdiscReplace(fq(ifindex, netlink.MakeHandle(major, uint16(i)), 0)); err != nil {
			return fmt.Errorf("set fq under tx queue %d of %s: %w", i, name, err)
		}
	}
	return nil
}

// FQQdiscs returns the fq qdiscs that pace the device's traffic: the root one, or one under
// each tx queue of an mq root. An error says what is missing (EDT would not pace there).
func FQQdiscs(ifindex int) ([]*netlink.Fq, error) {
	link, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return nil, fmt.Errorf("find ifindex %d: %w", ifindex, err)
	}
	qs, err := netlink.QdiscList(link)
	if err != nil {
		return nil, fmt.Errorf("list qdiscs of %s: %w", link.Attrs().Name, err)
	}
	var root netlink.Qdisc
	for _, q := range qs {
		if q.Attrs().Parent == netlink.HANDLE_ROOT {
			root = q
		}
	}
	if root == nil {
		return nil, fmt.Errorf("%s has no root qdisc", link.Attrs().Name)
	}
	if fq, ok := root.(*netlink.Fq); ok {
		return []*netlink.Fq{fq}, nil
	}
	if root.Type() != "mq" {
		return nil, fmt.Errorf("root qdisc of %s is %s, not fq or mq", link.Attrs().Name, root.Type())
	}
	major := root.Attrs().Handle >> 16
	var out []*netlink.Fq
	for i := 1; i <= link.Attrs().NumTxQueues; i++ {
		parent := netlink.MakeHandle(uint16(major), uint16(i))
		found := false
		for _, q := range qs {
			if fq, ok := q.(*netlink.Fq); ok && q.Attrs().Parent == parent {
				out, found = append(out, fq), true
			}
		}
		if !found {
			return nil, fmt.Errorf("tx queue %d of %s has no fq under its mq root", i, link.Attrs().Name)
		}
	}
	return out, nil
}
