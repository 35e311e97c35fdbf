//go:build linux

package lab

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/k8s/nsbridge"
)

// A node's VM can die and come back (Crash, then Boot): the cloud keeps the instance, its
// ENIs and their addresses; the guest's kernel state does not survive — processes, network
// namespace, links, bpffs pins — while its disk does, unless it is replaced.

// Crash makes the node's VM die, as a host failure or a kernel panic does: the agent is killed
// with SIGKILL, the pods' sandboxes die with it (their servers stop and their namespaces go,
// with no CNI call), the node's network namespace is deleted — the kernel removes every link
// in it, the ENIs' guest ends and the pods' host veths, each with its peer — and the node's
// pins go with its kernel's bpffs. The node's directory (its disk: the IPAM store, the
// sandbox records, the CNI cache) stays. Crash returns the pods that died, once the kernel
// has removed the ENIs' links, so the VPC no longer routes to the node.
//
// The pods' objects stay in the apiserver: the lab's control plane runs no node lifecycle
// controller, so marking them not ready and deleting them is the test's part.
func (n *Node) Crash() ([]*Pod, error) {
	if !n.NS.IsOpen() {
		return nil, fmt.Errorf("lab: %s is already down", n.Name)
	}
	links := n.pluggedLinks()
	var errs []error
	// The wire goes silent first, as it does when a VM dies: nothing of the node may answer
	// any more. Without this the pods' kernels outlive their servers by the milliseconds the
	// namespaces take to go and answer a new connection to a closed listener with a RST,
	// which a dead VM never sends (docs/reliability.md, node loss).
	if err := n.silence(); err != nil {
		errs = append(errs, err)
	}
	if err := n.KillAgent(); err != nil {
		errs = append(errs, err)
	}
	var dead []*Pod
	for _, p := range n.lab.Pods() {
		if p.Node == n {
			n.lab.Forget(p)
			dead = append(dead, p)
		}
	}
	// Everything that holds the namespace open: the launcher's thread, the bridges'
	// listeners, the lab's handle.
	n.closeLauncher()
	n.mu.Lock()
	for _, b := range []**nsbridge.Bridge{&n.bridge, &n.apiBridge} {
		if *b != nil {
			if err := (*b).Close(); err != nil {
				errs = append(errs, fmt.Errorf("lab: close a bridge into %s: %w", n.Name, err))
			}
			*b = nil
		}
	}
	n.mu.Unlock()
	nsID, idErr := nsInode(n.NS)
	n.NS.Close()
	if err := loader.RemovePins(n.PinRoot()); err != nil {
		errs = append(errs, fmt.Errorf("lab: remove the pins of %s: %w", n.Name, err))
	}
	if err := n.lab.waitLinksGone(links, 60*time.Second); err != nil {
		holders := "unknown (could not read the namespace's inode: " + fmt.Sprint(idErr) + ")"
		if idErr == nil {
			holders = nsHolders(nsID)
		}
		errs = append(errs, fmt.Errorf("lab: %s crashed but its namespace lingers: %w; processes in it or holding it: %s", n.Name, err, holders))
	}
	n.lab.log.Info("node crashed", zap.String("node", n.Name), zap.Int("pods", len(dead)), zap.Strings("vpcLinks", links))
	return dead, errors.Join(errs...)
}

// BootOptions configure Node.Boot.
type BootOptions struct {
	// WipeDisk gives the node a new disk, as replacing an instance's system disk does (same
	// instance ID, same ENIs): the agent's IPAM store, its sandbox records and the CNI cache
	// are gone, so the new agent learns the node's ENIs from the cloud alone.
	WipeDisk bool
}

// Boot brings a crashed node back under the same instance: a fresh network namespace into
// which the cloud plugs every ENI still attached to the instance (ecsemu.ReplugInstance:
// eth0 configured as the image does, the secondary ENIs down and unconfigured), the lab's
// CNI, launcher and bridges wired into it. The agent is not started: the test starts it
// (StartAgent), as the DaemonSet would once the node is back, and can time it.
func (n *Node) Boot(o BootOptions) (replugged []string, err error) {
	if n.NS.IsOpen() {
		return nil, fmt.Errorf("lab: %s is running; Crash it first", n.Name)
	}
	ns, err := nsutil.NewAnon()
	if err != nil {
		return nil, fmt.Errorf("lab: new namespace for %s: %w", n.Name, err)
	}
	n.NS = ns
	n.lab.sdn.SetInstanceNS(n.InstanceID, ns)
	if replugged, err = n.lab.emu.ReplugInstance(n.InstanceID); err != nil {
		return replugged, fmt.Errorf("lab: boot %s: %w", n.Name, err)
	}
	if o.WipeDisk {
		for _, f := range []string{"ipam.db", "sandboxes.json", "cni-cache"} {
			if err := os.RemoveAll(filepath.Join(n.dir, f)); err != nil {
				return replugged, fmt.Errorf("lab: wipe the disk of %s: %w", n.Name, err)
			}
		}
		if err := os.MkdirAll(filepath.Join(n.dir, "cni-cache"), 0o700); err != nil {
			return replugged, fmt.Errorf("lab: wipe the disk of %s: %w", n.Name, err)
		}
	}
	if err := n.wire(); err != nil {
		return replugged, err
	}
	n.lab.log.Info("node booted", zap.String("node", n.Name), zap.Strings("enis", replugged), zap.Bool("wipedDisk", o.WipeDisk))
	return replugged, nil
}

// pluggedLinks names the VPC-side links of the ENIs the cloud has plugged into the node (a
// trunk's members ride on its link and have none of their own).
func (n *Node) pluggedLinks() []string {
	var out []string
	for _, e := range n.lab.emu.Snapshot().ENIs {
		if e.Plugged && e.InstanceID == n.InstanceID && e.Trunk == "" {
			out = append(out, ecsemu.VPCLinkName(e.ID))
		}
	}
	return out
}

// silence sets every link of the node's namespace but lo down: the node sends nothing more,
// and the VPC-side ends of its ENIs lose their carrier. The VPC router keeps its /32 routes
// through them (a carrier loss only marks them linkdown) and what it forwards to them is
// dropped without an answer, as a dead VM's ENI, still attached, takes packets and answers
// none. (Setting the VPC-side ends down instead would remove those routes, and the router
// would answer ICMP net unreachable.)
func (n *Node) silence() error {
	h, err := netlink.NewHandleAt(n.NS)
	if err != nil {
		return fmt.Errorf("lab: open netlink in the namespace of %s: %w", n.Name, err)
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return fmt.Errorf("lab: list the links of %s: %w", n.Name, err)
	}
	var errs []error
	for _, link := range links {
		if link.Attrs().Flags&net.FlagLoopback != 0 {
			continue
		}
		if err := h.LinkSetDown(link); err != nil {
			errs = append(errs, fmt.Errorf("lab: set %s of crashing %s down: %w", link.Attrs().Name, n.Name, err))
		}
	}
	return errors.Join(errs...)
}

// waitLinksGone waits until none of the VPC namespace's links named remains: the kernel
// removes a veth pair when either end's namespace is destroyed, which it does asynchronously
// once the last reference is dropped.
func (l *Lab) waitLinksGone(names []string, timeout time.Duration) error {
	h, err := netlink.NewHandleAt(l.vpc)
	if err != nil {
		return fmt.Errorf("open netlink in the VPC namespace: %w", err)
	}
	defer h.Close()
	deadline := time.Now().Add(timeout)
	for {
		var left []string
		for _, name := range names {
			if _, err := h.LinkByName(name); err == nil {
				left = append(left, name)
			}
		}
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("VPC-side links %v still exist after %v: something still holds the node's namespace", left, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// nsInode is a namespace's inode number, what /proc/PID/ns/net links name ("net:[N]").
func nsInode(ns netns.NsHandle) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(ns), &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// nsHolders lists the threads whose network namespace is net:[ino] and the processes holding
// a file descriptor on it: what keeps a node's namespace alive after Crash (sockets hold it
// too, and are not listed).
func nsHolders(ino uint64) string {
	want := fmt.Sprintf("net:[%d]", ino)
	var out []string
	tasks, _ := filepath.Glob("/proc/[0-9]*/task/[0-9]*/ns/net")
	for _, t := range tasks {
		if l, err := os.Readlink(t); err == nil && l == want {
			comm, _ := os.ReadFile(filepath.Join(filepath.Dir(filepath.Dir(t)), "comm"))
			out = append(out, fmt.Sprintf("task %s (%s)", filepath.Dir(filepath.Dir(t)), strings.TrimSpace(string(comm))))
		}
	}
	fds, _ := filepath.Glob("/proc/[0-9]*/fd/*")
	for _, f := range fds {
		if l, err := os.Readlink(f); err == nil && l == want {
			out = append(out, "fd "+f)
		}
	}
	if len(out) == 0 {
		return "none (a socket, or the kernel's namespace clean-up is slow)"
	}
	return strings.Join(out, ", ")
}
