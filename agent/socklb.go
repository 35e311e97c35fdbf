package agent

// Socket-level load balancing (loader/sock.go, docs/socket-lb.md): the sock object's cgroup
// hooks translate connect()/sendmsg() to a ClusterIP into a backend for every process in the
// configured cgroup, host-network processes included. The agent loads and attaches them
// after the datapath, keeps them when it stops (their links are pinned), and destroys
// connected UDP sockets stuck on a backend the service reconciler removed.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/service/lbmap"
)

// SocketLBConfig is the socketLB block of the agent config. Cilium spells these
// --bpf-lb-sock (Helm socketLB.enabled, on with kube-proxy-replacement=true) and
// --cgroup-root (Helm cgroup.hostRoot); Terway's datapath v2 runs Cilium and uses its names.
type SocketLBConfig struct {
	// Enabled attaches the socket hooks. Off (the default) removes hooks an earlier agent
	// left, and Services are served by the tc path for pods only.
	Enabled bool `json:"enabled,omitempty"`
	// Cgroup is the cgroup v2 directory whose processes (and their descendants') are
	// translated. Default: the cgroup v2 root (/sys/fs/cgroup, or /sys/fs/cgroup/unified on
	// a hybrid host), i.e. every process on the node, as Cilium does.
	Cgroup string `json:"cgroup,omitempty"`
}

func (c SocketLBConfig) validate() []error {
	if c.Cgroup != "" && !filepath.IsAbs(c.Cgroup) {
		return []error{fmt.Errorf("socketLB.cgroup %q must be an absolute path to a cgroup v2 directory", c.Cgroup)}
	}
	if c.Cgroup != "" && !c.Enabled {
		return []error{fmt.Errorf("socketLB.cgroup is %q but socketLB.enabled is false: set enabled, or remove cgroup", c.Cgroup)}
	}
	return nil
}

// sockLB is the agent's running socket LB: the loaded object and the destroy loop.
type sockLB struct {
	lb   *loader.SockLB
	log  *zap.Logger
	kick chan struct{}
}

// startSockLB loads and attaches the socket hooks, or removes them when the config turns
// them off. A kernel without the hooks is logged and leaves the tc path alone in charge; a
// cgroup that is not cgroup v2 is an error (the operator asked for something that cannot
// be). It returns the function that stops the destroy loop.
func (a *Agent) startSockLB(ctx context.Context, dp *loader.Datapath) (func(), error) {
	root := dp.Config().PinRoot
	cfg := a.cfg.SocketLB
	if !cfg.Enabled {
		if err := loader.DetachSock(root); err != nil {
			return nil, fmt.Errorf("remove the socket LB hooks of an earlier agent (socketLB is off): %w", err)
		}
		return func() {}, nil
	}
	cgroup := cfg.Cgroup
	if cgroup == "" {
		r, err := loader.CgroupV2Root()
		if err != nil {
			return nil, fmt.Errorf("socketLB: %w", err)
		}
		cgroup = r
	}
	lb, err := dp.LoadSock()
	if errors.Is(err, ebpf.ErrNotSupported) {
		a.log.Warn("socket LB unavailable on this kernel; the tc path serves pods, host-network clients get no Services",
			zap.Error(err))
		return func() {}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("socketLB: %w", err)
	}
	if err := lb.Attach(cgroup); err != nil {
		lb.Close()
		return nil, fmt.Errorf("socketLB: %w", err)
	}
	st := lb.Status()
	if !st.UDPDestroy {
		a.log.Warn("connected UDP sockets on a removed backend cannot be destroyed on this kernel; "+
			"they keep their backend until the application reconnects", zap.String("why", st.DestroyUnsupported))
	}
	for h, why := range st.Missing {
		a.log.Warn("socket LB hook missing", zap.String("hook", string(h)), zap.String("why", why))
	}
	s := &sockLB{lb: lb, log: a.log.Named("socklb"), kick: make(chan struct{}, 1)}
	a.mu.Lock()
	a.sock = s
	a.mu.Unlock()
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); s.destroyLoop(ctx, st.UDPDestroy) }()
	s.kick <- struct{}{} // backends removed while no agent ran
	return func() {
		cancel()
		<-done
		a.mu.Lock()
		a.sock = nil
		a.mu.Unlock()
		lb.Close()
	}, nil
}

// SockLB is the loaded socket LB, nil when it is off or the kernel lacks it.
func (a *Agent) SockLB() *loader.SockLB {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.sock == nil {
		return nil
	}
	return a.sock.lb
}

// lbMaps are the maps the service reconciler writes. With socket LB on, removing a backend
// from a frontend (its membership entry) also schedules a pass that destroys the connected
// UDP sockets still on it.
func (a *Agent) lbMaps(dp *loader.Datapath) lbmap.LBMaps {
	a.mu.Lock()
	s := a.sock
	a.mu.Unlock()
	if s == nil {
		return dp.Maps()
	}
	return &memberWatch{Maps: dp.Maps(), removed: s.backendRemoved}
}

// memberWatch is loader.Maps (batch writes included) that reports membership deletes.
type memberWatch struct {
	*loader.Maps
	removed func()
}

func (m *memberWatch) DeleteMember(k loader.MemberKey) error {
	err := m.Maps.DeleteMember(k)
	m.removed()
	return err
}

func (s *sockLB) backendRemoved() {
	select {
	case s.kick <- struct{}{}:
	default: // a pass is already due; it will see this removal too
	}
}

// destroyLoop runs a destroy pass after every burst of backend removals.
func (s *sockLB) destroyLoop(ctx context.Context, supported bool) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.kick:
		}
		if !supported {
			continue
		}
		n, err := destroyStaleUDPEverywhere(s.lb)
		if err != nil {
			s.log.Warn("destroy pass for connected UDP sockets on removed backends incomplete", zap.Error(err))
		}
		if n > 0 {
			s.log.Info("destroyed connected UDP sockets on removed backends", zap.Int("sockets", n))
		}
	}
}

// destroyStaleUDPEverywhere runs the destroy iterator in every network namespace a process
// of this node is in (the node's and each pod's): a socket iterator sees one namespace.
func destroyStaleUDPEverywhere(lb *loader.SockLB) (int, error) {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return 0, fmt.Errorf("list /proc: %w", err)
	}
	seen := map[uint64]bool{}
	total := 0
	var errs []error
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err != nil {
			continue
		}
		path := filepath.Join("/proc", p.Name(), "ns", "net")
		fi, err := os.Stat(path)
		if err != nil {
			continue // the process ended
		}
		ino := fi.Sys().(*syscall.Stat_t).Ino
		if seen[ino] {
			continue
		}
		seen[ino] = true
		h, err := netns.GetFromPath(path)
		if err != nil {
			continue
		}
		err = nsutil.Do(h, func() error {
			d, err := lb.DestroyStaleUDP()
			total += len(d)
			return err
		})
		h.Close()
		if err != nil {
			errs = append(errs, fmt.Errorf("network namespace of pid %s: %w", p.Name(), err))
		}
	}
	return total, errors.Join(errs...)
}
