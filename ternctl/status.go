package ternctl

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/spf13/cobra"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/loader"
)

// Status is `ternctl status`: the agent as its socket answers, and the datapath and kernel as
// this node shows them (these parts work while the agent is down).
type Status struct {
	Agent       AgentStatus    `json:"agent"`
	IPAM        *IPAMView      `json:"ipam,omitempty"` // nil when the agent does not answer
	Datapath    DatapathStatus `json:"datapath"`
	AttachMode  []string       `json:"attachModes"` // tcx and/or clsact, as the attach points show
	Attachments []Attachment   `json:"attachments"`
	Kernel      KernelStatus   `json:"kernel"`
	Ternctl     string         `json:"ternctlVersion"`
}

// AgentStatus is what the agent's socket says about its readiness.
type AgentStatus struct {
	Reachable bool   `json:"reachable"`
	Error     string `json:"error,omitempty"`
	// Ready is CNI STATUS: the pool serves and every component is ready.
	Ready   bool   `json:"ready"`
	Message string `json:"message,omitempty"`
	// Readyz is whether /readyz (the kubelet's readiness probe) answers 200.
	Readyz     bool                     `json:"readyz"`
	Components []api.ComponentReadiness `json:"components"`
	// BandwidthMode is how the node enforces pod egress limits: "edt" (fq present) or
	// "policer" (issue 10: the mode is probed at agent start).
	BandwidthMode string `json:"bandwidthMode,omitempty"`
}

// DatapathStatus is the pinned maps and how full they are.
type DatapathStatus struct {
	PinRoot string      `json:"pinRoot"`
	Loaded  bool        `json:"loaded"` // the maps are pinned
	Error   string      `json:"error,omitempty"`
	Maps    []MapStatus `json:"maps"`
}

// MapStatus is one pinned map.
type MapStatus struct {
	Name       string `json:"name"`
	Type       string `json:"type"`
	Entries    int    `json:"entries"` // -1: not counted (arrays, ring buffers)
	MaxEntries uint32 `json:"maxEntries"`
}

// Attachment is one place tern's programs run.
type Attachment struct {
	Interface string `json:"interface"`
	IfIndex   int    `json:"ifindex"`
	Direction string `json:"direction"` // ingress, egress
	Mode      string `json:"mode"`      // tcx, clsact
	Program   string `json:"program"`
	ProgramID uint32 `json:"programID,omitempty"`
}

// KernelStatus is the kernel release and the BPF features tern uses.
type KernelStatus struct {
	Release  string          `json:"release"`
	Features map[string]bool `json:"features"`
}

func statusCommand(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Agent readiness per component, pool summary, pinned maps, attach points and kernel features",
		Long: `status asks the agent on its socket (/v1/status, /v1/readiness, /readyz) and reads the node
itself (pinned maps, tcx link pins and clsact filters, kernel features), so it says something
useful while the agent is down. Exit code 0 when the agent is ready, 3 when it does not answer,
4 when no datapath is pinned, 5 when it answers but is not ready.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st := e.status(cmd.Context())
			if err := e.render(st, func() *table { return statusTable(st) }); err != nil {
				return err
			}
			switch {
			case !st.Agent.Reachable:
				return withCode(ExitAgentDown, fmt.Errorf("tern-agent does not answer on %s: %s", e.opts.Socket, st.Agent.Error))
			case !st.Datapath.Loaded:
				return withCode(ExitNoDatapath, fmt.Errorf("no datapath pinned under %s: %s", st.Datapath.PinRoot, st.Datapath.Error))
			case !st.Agent.Ready || !st.Agent.Readyz:
				return withCode(ExitNotReady, fmt.Errorf("tern-agent is not ready: %s", orDash(st.Agent.Message)))
			}
			return nil
		},
	}
}

func (e *env) status(ctx context.Context) Status {
	st := Status{Attachments: []Attachment{}, AttachMode: []string{}, Ternctl: version()}
	c := e.client()
	if cs, err := c.Status(ctx); err != nil {
		st.Agent.Error = err.Error()
	} else {
		st.Agent.Reachable, st.Agent.Ready, st.Agent.Message = true, cs.Ready, cs.Message
		st.Agent.Components = []api.ComponentReadiness{}
		if r, err := c.Readiness(ctx); err == nil {
			st.Agent.Components = r.Components
		}
		st.Agent.Readyz, _, _ = c.Readyz(ctx)
		if s, err := c.State(ctx); err == nil {
			v := ipamView(s)
			st.IPAM = &v
			st.Agent.BandwidthMode = s.BandwidthMode
		}
	}
	st.Datapath = e.datapathStatus()
	st.Attachments = e.attachments()
	modes := map[string]bool{}
	for _, a := range st.Attachments {
		modes[a.Mode] = true
	}
	for m := range modes {
		st.AttachMode = append(st.AttachMode, m)
	}
	sort.Strings(st.AttachMode)
	st.Kernel = kernelStatus()
	return st
}

func (e *env) datapathStatus() DatapathStatus {
	ds := DatapathStatus{PinRoot: e.opts.PinRoot, Maps: []MapStatus{}}
	entries, err := os.ReadDir(e.opts.PinRoot)
	if err != nil {
		ds.Error = err.Error()
		return ds
	}
	for _, de := range entries {
		if de.IsDir() || !strings.HasPrefix(de.Name(), "tern_") {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(e.opts.PinRoot, de.Name()), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			continue // a pin moved aside mid-upgrade, or not a map
		}
		ms := MapStatus{Name: de.Name(), Type: m.Type().String(), Entries: -1, MaxEntries: m.MaxEntries()}
		switch m.Type() {
		case ebpf.Hash, ebpf.LRUHash, ebpf.LPMTrie, ebpf.LRUCPUHash, ebpf.PerCPUHash:
			if n, err := loader.CountEntries(m); err == nil {
				ms.Entries = n
			}
		}
		m.Close()
		ds.Maps = append(ds.Maps, ms)
	}
	// The maps every view needs: the datapath is there when they are.
	if m, err := loader.OpenPinnedMaps(e.opts.PinRoot); err != nil {
		ds.Error = err.Error()
	} else {
		m.Close()
		ds.Loaded = true
	}
	return ds
}

// attachments lists the tcx links tern pinned (links/[netdev_]if<N>_<dir>) and the clsact
// filters carrying its programs, in this network namespace.
func (e *env) attachments() []Attachment {
	out := []Attachment{}
	name := func(ifindex int) string {
		if l, err := netlink.LinkByIndex(ifindex); err == nil {
			return l.Attrs().Name
		}
		return "?"
	}
	dir := filepath.Join(e.opts.PinRoot, "links")
	if des, err := os.ReadDir(dir); err == nil {
		for _, de := range des {
			l, err := link.LoadPinnedLink(filepath.Join(dir, de.Name()), nil)
			if err != nil {
				continue
			}
			info, err := l.Info()
			l.Close()
			if err != nil || info.TCX() == nil {
				continue
			}
			a := Attachment{IfIndex: int(info.TCX().Ifindex), Mode: string(loader.AttachTCX), ProgramID: uint32(info.Program)}
			a.Interface = name(a.IfIndex)
			a.Direction = "egress"
			if info.TCX().AttachType == unix.BPF_TCX_INGRESS {
				a.Direction = "ingress"
			}
			if p, err := ebpf.NewProgramFromID(info.Program); err == nil {
				if pi, err := p.Info(); err == nil {
					a.Program = pi.Name
				}
				p.Close()
			}
			out = append(out, a)
		}
	}
	links, err := netlink.LinkList()
	if err == nil {
		for _, l := range links {
			for _, parent := range []struct {
				h   uint32
				dir string
			}{{netlink.HANDLE_MIN_INGRESS, "ingress"}, {netlink.HANDLE_MIN_EGRESS, "egress"}} {
				fs, err := netlink.FilterList(l, parent.h)
				if err != nil {
					continue
				}
				for _, f := range fs {
					bf, ok := f.(*netlink.BpfFilter)
					if !ok || !strings.HasPrefix(bf.Name, "tern_") {
						continue
					}
					out = append(out, Attachment{Interface: l.Attrs().Name, IfIndex: l.Attrs().Index, Direction: parent.dir,
						Mode: string(loader.AttachClsact), Program: strings.SplitN(bf.Name, ":", 2)[0], ProgramID: uint32(bf.Id)})
				}
			}
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].IfIndex != out[j].IfIndex {
			return out[i].IfIndex < out[j].IfIndex
		}
		return out[i].Direction < out[j].Direction
	})
	return out
}

func kernelStatus() KernelStatus {
	ks := KernelStatus{Features: map[string]bool{}}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		ks.Release = unix.ByteSliceToString(u.Release[:])
	}
	have := func(err error) bool { return err == nil }
	ks.Features["map_lru_hash"] = have(features.HaveMapType(ebpf.LRUHash))
	ks.Features["map_lpm_trie"] = have(features.HaveMapType(ebpf.LPMTrie))
	ks.Features["map_ringbuf"] = have(features.HaveMapType(ebpf.RingBuf))
	ks.Features["bounded_loops"] = have(features.HaveBoundedLoops())
	ks.Features["isa_v3"] = have(features.HaveV3ISA())
	for name, fn := range map[string]asm.BuiltinFunc{
		"helper_redirect_peer":  asm.FnRedirectPeer,
		"helper_redirect_neigh": asm.FnRedirectNeigh,
		"helper_fib_lookup":     asm.FnFibLookup,
		"helper_ringbuf_output": asm.FnRingbufOutput,
		"helper_loop":           asm.FnLoop,
	} {
		ks.Features[name] = have(features.HaveProgramHelper(ebpf.SchedCLS, fn))
	}
	return ks
}

func version() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		v := bi.Main.Version
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				v += " (" + s.Value[:12] + ")"
			}
		}
		return v
	}
	return "unknown"
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func statusTable(st Status) *table {
	t := &table{header: []string{"SECTION", "ITEM", "STATE", "DETAIL"}}
	if !st.Agent.Reachable {
		t.add("agent", "socket", "unreachable", st.Agent.Error)
	} else {
		t.add("agent", "cni status", map[bool]string{true: "ready", false: "not ready"}[st.Agent.Ready], orDash(st.Agent.Message))
		t.add("agent", "/readyz", map[bool]string{true: "200", false: "503"}[st.Agent.Readyz], "-")
		if st.Agent.BandwidthMode != "" {
			t.add("agent", "bandwidth", st.Agent.BandwidthMode, "pod egress limits: edt (fq pacing) or policer (token bucket)")
		}
		for _, c := range st.Agent.Components {
			t.add("component", c.Name, map[bool]string{true: "ready", false: "not ready"}[c.Ready], orDash(c.Reason))
		}
	}
	if st.IPAM != nil {
		t.add("ipam", st.IPAM.Node, st.IPAM.Pool.InstanceType, ipamSummary(*st.IPAM))
	}
	if !st.Datapath.Loaded {
		t.add("datapath", st.Datapath.PinRoot, "not pinned", st.Datapath.Error)
	}
	for _, m := range st.Datapath.Maps {
		n := "-"
		if m.Entries >= 0 {
			n = strconv.Itoa(m.Entries)
		}
		t.add("map", m.Name, m.Type, n+"/"+strconv.Itoa(int(m.MaxEntries))+" entries")
	}
	for _, a := range st.Attachments {
		t.add("attach", fmt.Sprintf("%s(%d) %s", a.Interface, a.IfIndex, a.Direction), a.Mode, a.Program)
	}
	t.add("kernel", "release", st.Kernel.Release, "-")
	names := make([]string, 0, len(st.Kernel.Features))
	for n := range st.Kernel.Features {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		t.add("kernel", n, yesNo(st.Kernel.Features[n]), "-")
	}
	t.add("ternctl", "version", st.Ternctl, "-")
	return t
}
