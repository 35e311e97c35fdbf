package loader

// The sock object (bpf/sock.c): socket-level load balancing on cgroup v2 hooks. connect()
// and sendmsg() to a frontend get a backend before the first packet exists, so the
// packets carry the backend's address and the tc programs translate nothing; recvmsg() and
// getpeername() show the frontend again. The hooks are attached with bpf_links pinned under
// links/sock_<hook>, so a restarted agent swaps programs under the same links (no moment
// without them) and the hooks outlive the agent.
//
// What the kernel lacks is probed, never assumed:
//   - connect4 missing: no socket LB at all; the tc path serves pods as before.
//   - recvmsg4 (or recvmsg6, where connect6 exists) missing: UDP is not translated at the
//     socket (replies would show the backend's address); the tc path keeps translating pods' UDP.
//   - getpeername4/6 missing: TCP is translated, getpeername() shows the backend.
//   - connect6 and friends missing: dual-stack sockets' v4-mapped connects are not translated.
//   - bpf_link for cgroups missing (Linux < 5.7): no socket LB (a prog-attach could not be
//     replaced atomically nor found again by a restarted agent).
//   - bpf_sock_destroy missing (Linux < 6.5): connected UDP sockets on a removed backend are
//     not destroyed; see DestroyStaleUDP.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// SockHook is one of the cgroup socket hooks of the sock object.
type SockHook string

const (
	SockConnect4     SockHook = "connect4"
	SockSendmsg4     SockHook = "sendmsg4"
	SockRecvmsg4     SockHook = "recvmsg4"
	SockGetpeername4 SockHook = "getpeername4"
	// The IPv6 hooks translate only v4-mapped destinations (::ffff:VIP), for dual-stack
	// applications; each came in the same kernel release as its IPv4 twin.
	SockConnect6     SockHook = "connect6"
	SockSendmsg6     SockHook = "sendmsg6"
	SockRecvmsg6     SockHook = "recvmsg6"
	SockGetpeername6 SockHook = "getpeername6"
)

type sockHookDef struct {
	hook   SockHook
	prog   string
	attach ebpf.AttachType
}

// sockHookDefs lists the hooks, their programs and attach types.
func sockHookDefs() [8]sockHookDef {
	return [...]sockHookDef{
		{SockConnect4, SockProgTernSockConnect4, ebpf.AttachCGroupInet4Connect},
		{SockSendmsg4, SockProgTernSockSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
		{SockRecvmsg4, SockProgTernSockRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
		{SockGetpeername4, SockProgTernSockGetpeername4, ebpf.AttachCgroupInet4GetPeername},
		{SockConnect6, SockProgTernSockConnect6, ebpf.AttachCGroupInet6Connect},
		{SockSendmsg6, SockProgTernSockSendmsg6, ebpf.AttachCGroupUDP6Sendmsg},
		{SockRecvmsg6, SockProgTernSockRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg},
		{SockGetpeername6, SockProgTernSockGetpeername6, ebpf.AttachCgroupInet6GetPeername},
	}
}

// SockStatus says what socket-level load balancing does on this node.
type SockStatus struct {
	// Cgroup is the cgroup v2 directory the hooks are attached to ("" before Attach).
	Cgroup string
	// Hooks are the hooks loaded (and, after Attach, attached).
	Hooks []SockHook
	// Missing are the hooks this kernel cannot run, with the reason.
	Missing map[SockHook]string
	// TCP and UDP tell which protocols are translated at the socket. A protocol that is not
	// is left to the tc path (pods only).
	TCP, UDP bool
	// UDPDestroy tells whether connected UDP sockets on a removed backend are destroyed
	// (bpf_sock_destroy, Linux 6.5); DestroyUnsupported says why not.
	UDPDestroy         bool
	DestroyUnsupported string
}

// SockLB is the loaded sock object.
type SockLB struct {
	pinRoot string
	log     *zap.Logger
	progs   map[SockHook]*ebpf.Program
	coll    *ebpf.Collection
	destroy *ebpf.Program // nil where the kernel lacks bpf_sock_destroy
	status  SockStatus
}

// probeSockHook loads a trivial program for the hook's attach type: the kernel refuses the
// attach type if it does not know the hook.
func probeSockHook(at ebpf.AttachType) error {
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.CGroupSockAddr,
		AttachType:   at,
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
		License:      "GPL",
	})
	if err != nil {
		return err
	}
	return p.Close()
}

// LoadSock loads the sock object against this datapath's LB maps and tern_metrics. The
// hooks are not attached yet (Attach). A kernel without connect4 is an error wrapping
// ebpf.ErrNotSupported: the caller keeps the tc path alone.
//
// The node namespace is the calling thread's and its address the datapath's NodePortAddr
// (SockHost); LoadSockFor names them.
func (d *Datapath) LoadSock() (*SockLB, error) {
	h := SockHost{Addr: d.cfg.NodePortAddr}
	c, err := CurrentNetnsCookie()
	if err != nil {
		d.cfg.Logger.Warn("host-network sockets to LoadBalancer IPs with loadBalancerSourceRanges go untranslated", zap.Error(err))
	}
	h.NetnsCookie = c
	return d.LoadSockFor(h)
}

// LoadSockFor is LoadSock with the node's namespace and address given (SockHost).
func (d *Datapath) LoadSockFor(host SockHost) (*SockLB, error) {
	st := SockStatus{Missing: map[SockHook]string{}}
	have := map[SockHook]bool{}
	for _, h := range sockHookDefs() {
		if err := probeSockHook(h.attach); err != nil {
			st.Missing[h.hook] = err.Error()
			continue
		}
		have[h.hook] = true
	}
	if !have[SockConnect4] {
		return nil, fmt.Errorf("kernel has no cgroup connect4 hook (%s): socket-level load balancing off, "+
			"the tc path serves pods: %w", st.Missing[SockConnect4], ebpf.ErrNotSupported)
	}
	st.TCP = true
	// UDP needs every recvmsg hook of a family whose connect/sendmsg hooks translate, or
	// replies would show the backend; the one switch (CFG_SOCK_UDP) covers both families.
	st.UDP = have[SockRecvmsg4] && (!have[SockConnect6] || have[SockRecvmsg6])
	if !st.UDP {
		for _, h := range []SockHook{SockSendmsg4, SockSendmsg6} {
			if have[h] {
				delete(have, h)
				st.Missing[h] = "not used: without recvmsg4/recvmsg6 UDP replies would show the backend"
			}
		}
	}
	retval := features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnSetRetval) == nil

	spec, err := LoadSock()
	if err != nil {
		return nil, fmt.Errorf("parse embedded sock BPF object: %w", err)
	}
	if err := spec.Variables[SockVarCFG_SOCK_UDP].Set(b2u8(st.UDP)); err != nil {
		return nil, fmt.Errorf("set load-time variable %s: %w", SockVarCFG_SOCK_UDP, err)
	}
	if err := spec.Variables[SockVarCFG_SOCK_HAVE_SET_RETVAL].Set(b2u8(retval)); err != nil {
		return nil, fmt.Errorf("set load-time variable %s: %w", SockVarCFG_SOCK_HAVE_SET_RETVAL, err)
	}
	if err := setSockHost(spec, host); err != nil {
		return nil, err
	}
	destroySpec := spec.Copy()
	for _, h := range sockHookDefs() {
		if !have[h.hook] {
			delete(spec.Programs, h.prog)
		}
	}
	delete(spec.Programs, SockProgTernSockDestroyUdp)

	// Every map the sock object shares with the pod object (the LB maps, tern_metrics, the
	// event ring) is the pod object's very map (sizes from the agent's configuration); only
	// tern_sock_revnat is the sock object's own.
	repl := map[string]*ebpf.Map{}
	for name, m := range map[string]*ebpf.Map{
		SockMapTernServices: d.objs.TernServices, SockMapTernBackends: d.objs.TernBackends,
		SockMapTernLbMembers: d.objs.TernLbMembers, SockMapTernMetrics: d.objs.TernMetrics,
		PodMapTernLbSvcOpts: d.objs.TernLbSvcOpts, PodMapTernLbAffinity: d.objs.TernLbAffinity,
		PodMapTernLbMaglev: d.objs.TernLbMaglev, PodMapTernEvents: d.objs.TernEvents,
		PodMapTernLbSrcRanges: d.objs.TernLbSrcRanges,
		PodMapTernEventLimit:  d.objs.TernEventLimit,
	} {
		if _, ok := spec.Maps[name]; ok {
			repl[name] = m
		}
	}
	for name, ms := range spec.Maps {
		if _, ok := repl[name]; !ok && ms.Pinning == ebpf.PinByName && name != SockMapTernSockRevnat {
			return nil, fmt.Errorf("sock object declares pinned map %s, which LoadSock does not hand over from the pod object: add it", name)
		}
	}
	for name, m := range repl {
		spec.Maps[name].MaxEntries = m.MaxEntries()
		destroySpec.Maps[name].MaxEntries = m.MaxEntries()
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
		Maps:            ebpf.MapOptions{PinPath: d.cfg.PinRoot},
		MapReplacements: repl,
	})
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("kernel verifier rejected the sock programs: %+v", ve)
		}
		return nil, fmt.Errorf("load sock programs (pin root %s): %w", d.cfg.PinRoot, err)
	}
	s := &SockLB{pinRoot: d.cfg.PinRoot, log: d.cfg.Logger, coll: coll, progs: map[SockHook]*ebpf.Program{}}
	for _, h := range sockHookDefs() {
		if have[h.hook] {
			s.progs[h.hook] = coll.Programs[h.prog]
			st.Hooks = append(st.Hooks, h.hook)
		}
	}

	// The destroy iterator on its own: a kernel without bpf_sock_destroy refuses only it.
	for name := range destroySpec.Programs {
		if name != SockProgTernSockDestroyUdp {
			delete(destroySpec.Programs, name)
		}
	}
	repl[SockMapTernSockRevnat] = coll.Maps[SockMapTernSockRevnat]
	dcoll, err := ebpf.NewCollectionWithOptions(destroySpec, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		st.DestroyUnsupported = fmt.Sprintf("the UDP socket iterator with bpf_sock_destroy (Linux 6.5+) did not load: %v", err)
	} else {
		s.destroy = dcoll.Programs[SockProgTernSockDestroyUdp]
		delete(dcoll.Programs, SockProgTernSockDestroyUdp)
		dcoll.Close() // the maps are replacements; only the program is kept
		st.UDPDestroy = true
	}
	s.status = st
	return s, nil
}

func b2u8(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// Status says what the loaded object does (and after Attach, where).
func (s *SockLB) Status() SockStatus {
	st := s.status
	st.Hooks = append([]SockHook(nil), st.Hooks...)
	missing := make(map[SockHook]string, len(st.Missing))
	for k, v := range st.Missing {
		missing[k] = v
	}
	st.Missing = missing
	return st
}

// RevNAT is tern_sock_revnat, for tests and ternctl.
func (s *SockLB) RevNAT() *ebpf.Map { return s.coll.Maps[SockMapTernSockRevnat] }

func sockLinkPin(root string, h SockHook) string {
	return filepath.Join(root, "links", "sock_"+string(h))
}

// CgroupV2Root finds the cgroup v2 hierarchy: /sys/fs/cgroup on a unified host, or
// /sys/fs/cgroup/unified on a hybrid one (cgroup v1 controllers plus a v2 tree).
func CgroupV2Root() (string, error) {
	for _, p := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		if isCgroup2(p) {
			return p, nil
		}
	}
	return "", errors.New("no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified: mount one " +
		"(mount -t cgroup2 none /sys/fs/cgroup/unified) or set the agent's sockLBCgroup to a cgroup v2 directory")
}

func isCgroup2(p string) bool {
	var fs unix.Statfs_t
	return unix.Statfs(p, &fs) == nil && fs.Type == unix.CGROUP2_SUPER_MAGIC
}

// cgroupID is the id the kernel reports for a cgroup v2 directory: its inode number.
func cgroupID(path string) (uint64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return fi.Sys().(*syscall.Stat_t).Ino, nil
}

// Attach attaches the loaded hooks to a cgroup v2 directory (every process in it and its
// descendants is translated). Links already pinned by an earlier agent on the same cgroup
// get the new programs atomically; links on another cgroup (the setting changed) are
// replaced by new ones; links of hooks this load does not use are removed.
func (s *SockLB) Attach(cgroup string) error {
	if !isCgroup2(cgroup) {
		return fmt.Errorf("socket LB cgroup %s is not a cgroup v2 directory: set sockLBCgroup to one "+
			"(the v2 root is %s)", cgroup, describeCgroupRoot())
	}
	id, err := cgroupID(cgroup)
	if err != nil {
		return fmt.Errorf("stat socket LB cgroup %s: %w", cgroup, err)
	}
	if err := os.MkdirAll(filepath.Join(s.pinRoot, "links"), 0o700); err != nil {
		return fmt.Errorf("create link pin directory under %s: %w", s.pinRoot, err)
	}
	for _, h := range sockHookDefs() {
		prog := s.progs[h.hook]
		pin := sockLinkPin(s.pinRoot, h.hook)
		if prog == nil {
			if err := unpinLink(pin); err != nil {
				return fmt.Errorf("remove the %s hook this kernel cannot use: %w", h.hook, err)
			}
			continue
		}
		if err := s.attachHook(h, prog, pin, cgroup, id); err != nil {
			return err
		}
	}
	s.status.Cgroup = cgroup
	s.log.Info("socket LB attached", zap.String("cgroup", cgroup), zap.Any("hooks", s.status.Hooks),
		zap.Bool("udp", s.status.UDP), zap.Bool("udpDestroy", s.status.UDPDestroy))
	return nil
}

func describeCgroupRoot() string {
	if r, err := CgroupV2Root(); err == nil {
		return r
	}
	return "not mounted"
}

func (s *SockLB) attachHook(h sockHookDef, prog *ebpf.Program, pin, cgroup string, id uint64) error {
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := l.Info()
		if ierr == nil && info.Cgroup() != nil && info.Cgroup().CgroupId == id {
			err := l.Update(prog)
			l.Close()
			if err != nil {
				return fmt.Errorf("replace the %s program on cgroup %s (link %s): %w", h.hook, cgroup, pin, err)
			}
			return nil
		}
		// Attached elsewhere (the cgroup setting changed) or a link that is gone: the new
		// link goes in first, so the old cgroup is never left without one by an error here.
		l.Close()
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("read socket LB link pin %s: %w", pin, err)
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: h.attach, Program: prog})
	if err != nil {
		return fmt.Errorf("attach %s to cgroup %s: %w", h.hook, cgroup, err)
	}
	defer l.Close()
	if err := unpinLink(pin); err != nil {
		return err
	}
	if err := l.Pin(pin); err != nil {
		// A prog-attach (no bpf_link for cgroups, Linux < 5.7) cannot be pinned; closing
		// it detaches it.
		return fmt.Errorf("pin %s link at %s (cgroup bpf_links need Linux 5.7): %w", h.hook, pin, err)
	}
	return nil
}

// unpinLink removes a link pin, detaching its program; a missing pin is not an error.
func unpinLink(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		// Not a link any more (a stale file): remove the name.
		if rerr := os.Remove(pin); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			return fmt.Errorf("remove link pin %s: %w", pin, rerr)
		}
		return nil
	}
	defer l.Close()
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpin link %s: %w", pin, err)
	}
	return nil
}

// DetachSock removes the socket hooks pinned under root (socket LB switched off). The
// tern_sock_revnat map stays: sockets translated earlier keep their frontend addresses
// until they close.
func DetachSock(root string) error {
	var errs []error
	for _, h := range sockHookDefs() {
		errs = append(errs, unpinLink(sockLinkPin(root, h.hook)))
	}
	return errors.Join(errs...)
}

// SockAttached lists the hooks with a live link pinned under root, and the cgroup id they
// are attached to (0 if none).
func SockAttached(root string) (hooks []SockHook, cgroupID uint64) {
	for _, h := range sockHookDefs() {
		l, err := link.LoadPinnedLink(sockLinkPin(root, h.hook), nil)
		if err != nil {
			continue
		}
		if info, err := l.Info(); err == nil && info.Cgroup() != nil {
			hooks = append(hooks, h.hook)
			cgroupID = info.Cgroup().CgroupId
		}
		l.Close()
	}
	sort.Slice(hooks, func(i, j int) bool { return hooks[i] < hooks[j] })
	return hooks, cgroupID
}

// DestroyedSocket is a connected UDP socket DestroyStaleUDP destroyed.
type DestroyedSocket struct {
	Cookie  uint64
	Backend netip.AddrPort
}

// DestroyStaleUDP destroys the connected UDP sockets, in the calling thread's network
// namespace, that connect4 sent to a backend that is no longer one of its frontend's (the
// iterator sees only the namespace it is opened in: the agent calls it in the node's and
// in each pod's). The application's next send or receive fails with ECONNABORTED, and a
// new connect() picks a live backend. Without bpf_sock_destroy (Linux < 6.5) it returns an
// error wrapping ebpf.ErrNotSupported: such sockets keep their backend until they close
// (the tc path's per-datagram membership check never sees them: their packets already
// carry the backend's address).
func (s *SockLB) DestroyStaleUDP() ([]DestroyedSocket, error) {
	if s.destroy == nil {
		return nil, fmt.Errorf("%s: %w", s.status.DestroyUnsupported, ebpf.ErrNotSupported)
	}
	it, err := link.AttachIter(link.IterOptions{Program: s.destroy})
	if err != nil {
		return nil, fmt.Errorf("attach the UDP socket iterator: %w", err)
	}
	defer it.Close()
	rd, err := it.Open()
	if err != nil {
		return nil, fmt.Errorf("open the UDP socket iterator: %w", err)
	}
	defer rd.Close()
	buf, err := io.ReadAll(rd)
	if err != nil {
		return nil, fmt.Errorf("run the UDP socket iterator: %w", err)
	}
	recs := make([]SockSockDestroyed, len(buf)/binary.Size(SockSockDestroyed{}))
	if err := binary.Read(bytes.NewReader(buf), binary.NativeEndian, recs); err != nil {
		return nil, fmt.Errorf("decode %d bytes of destroyed-socket records: %w", len(buf), err)
	}
	out := make([]DestroyedSocket, 0, len(recs))
	for _, r := range recs {
		out = append(out, DestroyedSocket{Cookie: r.Cookie,
			Backend: netip.AddrPortFrom(BEToAddr(r.Addr), BEToPort(r.Port))})
	}
	return out, nil
}

// Close releases this process's handles; attached hooks stay (their links are pinned).
func (s *SockLB) Close() error {
	if s.destroy != nil {
		s.destroy.Close()
	}
	s.coll.Close()
	return nil
}
