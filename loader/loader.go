// Package loader loads tern's BPF programs with their load-time configuration, pins their
// maps under a bpffs directory so that state outlives the agent, and attaches the pod
// programs to veths and the netdev programs to ENI links and the primary NIC with tcx (or
// clsact where tcx is missing).
package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"go.uber.org/zap"
)

// DefaultPinRoot is where an agent pins maps and links unless told otherwise.
const DefaultPinRoot = "/sys/fs/bpf/tern"

// Config is the load-time configuration of the datapath. Zero fields take the defaults.
type Config struct {
	// PinRoot is the bpffs directory for maps and links. Tests use their own.
	PinRoot string
	// HairpinIP masquerades a pod reaching itself through a Service.
	HairpinIP netip.Addr
	// Conntrack lifetimes.
	CTTCPSynTimeout         time.Duration
	CTTCPEstablishedTimeout time.Duration
	CTTCPClosingTimeout     time.Duration
	CTUDPTimeout            time.Duration
	// Map sizes. They are fixed when a map is first pinned: changing one later makes Load
	// move the pinned map aside and create a new one with the entries that fit (see
	// upgrade.go; FinishUpgrade removes the old one). MaxFlows counts conntrack entries: a
	// service flow takes two. MaxBackends sizes both the backend slots and the membership
	// index.
	MaxServices uint32
	MaxBackends uint32
	MaxFlows    uint32
	// MaxAffinity is how many (frontend, client) sessionAffinity entries the LRU keeps
	// (default 65536); MaxMaglevBlocks how many 16-entry blocks of Maglev tables fit
	// (default 65536: a frontend of N backends takes about 100 N / 16). The per-frontend
	// options map holds as many as the frontends (at least its default 131072).
	MaxAffinity     uint32
	MaxMaglevBlocks uint32
	// MaxPolicyCIDRs sizes tern_policy_cidrs, the ipBlock prefixes of NetworkPolicies
	// (default 16384).
	MaxPolicyCIDRs uint32
	// CollisionPortMin and CollisionPortCount are the source ports a service flow gets when
	// its translated tuple is already another live flow's (default 61000, 4536 ports).
	CollisionPortMin   uint16
	CollisionPortCount uint16
	// BandwidthEDT shapes pod egress by Earliest Departure Time (needs the fq qdisc on the
	// devices pod traffic leaves by); false polices it with a token bucket. The agent sets
	// it from bandwidth.ProbeFQ.
	BandwidthEDT bool
	// Masquerade (bpf/lib/snat.h). MasqAddr is the node address pod traffic leaving the VPC
	// is translated to; invalid (the zero value) turns masquerade off. MasqIfindex is the
	// interface that address lives on (the primary NIC); a pod's translated packet leaving
	// through another link (an ENI) is redirected out of it. 0 leaves packets on their link.
	MasqAddr    netip.Addr
	MasqIfindex int
	// NodePortAddr turns on the netdev path of NodePort, LoadBalancer IP and externalIP
	// frontends (bpf/lib/nodeport.h): an external client's flow to a backend on another
	// node is translated to this node address (the primary NIC's), with a port from the
	// masquerade range. Invalid (the zero value): external frontends are served to pods and
	// host processes only.
	NodePortAddr netip.Addr
	// SNATPortMin and SNATPortCount are the ports a masqueraded flow gets when its own is
	// taken (default 1024, 64512: 1024-65535); SNATTries bounds the candidates one new flow
	// looks at (default 32, at most 256). MaxSNATFlows sizes tern_snat (default 131072).
	SNATPortMin   uint16
	SNATPortCount uint16
	SNATTries     uint32
	MaxSNATFlows  uint32
	// LocalPortRange is the node's net.ipv4.ip_local_port_range (ReadLocalPortRange in the
	// agent's namespace; the zero value: Linux's default 32768-60999; an empty range, Min >
	// Max: none). Masquerade and NodePort SNAT never give a flow one of these ports, so a
	// translated flow and a connection of the node's own never share a wire tuple
	// (bpf/lib/portclaim.h). KeepOutOf sets it.
	LocalPortRange PortRange
	// PolicyAllowedEvents sends allowed NetworkPolicy verdicts on tern_events too (denials
	// always are): one event per new allowed flow of an isolated pod.
	PolicyAllowedEvents bool
	// ForceClsact attaches with clsact even where tcx works, so the fallback stays tested.
	ForceClsact bool
	// Forwarding is ForwardRedirect (default) or ForwardStack (forward.go).
	Forwarding Forwarding
	Logger     *zap.Logger
}

func (c *Config) setDefaults() {
	if c.PinRoot == "" {
		c.PinRoot = DefaultPinRoot
	}
	if !c.HairpinIP.IsValid() {
		c.HairpinIP = netip.MustParseAddr("169.254.42.1")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.CTTCPSynTimeout, 60*time.Second)
	def(&c.CTTCPEstablishedTimeout, 6*time.Hour)
	def(&c.CTTCPClosingTimeout, 10*time.Second)
	def(&c.CTUDPTimeout, 60*time.Second)
	if c.CollisionPortMin == 0 {
		c.CollisionPortMin = 61000
	}
	if c.CollisionPortCount == 0 {
		c.CollisionPortCount = uint16(65536 - int(c.CollisionPortMin))
	}
	if c.SNATPortMin == 0 {
		c.SNATPortMin = 1024
	}
	if c.SNATPortCount == 0 {
		c.SNATPortCount = uint16(65536 - int(c.SNATPortMin))
	}
	if c.SNATTries == 0 {
		c.SNATTries = 32
	}
	if c.LocalPortRange == (PortRange{}) {
		c.LocalPortRange = PortRange{Min: 32768, Max: 60999}
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
}

// Datapath is the loaded pod and netdev programs and their pinned maps.
type Datapath struct {
	cfg    Config
	objs   PodObjects
	netdev NetdevObjects  // the programs for ENI links and the primary NIC (netdev.go)
	fwd    ForwardSupport // what the forward stage redirects (forward.go)

	// An upgrade in progress (upgrade.go): pins Load moved aside, the first layout's
	// conntrack map while its flows are still being converted, and what the last
	// conversion did.
	moved         []movedMap
	v1CT          *ebpf.Map
	lastMigration MigrationStats
}

// Load loads the pod and netdev programs, creating the pinned maps on first use and reusing
// them afterwards, so conntrack and service state survive an agent restart.
func Load(cfg Config) (*Datapath, error) {
	cfg.setDefaults()
	if int(cfg.CollisionPortMin)+int(cfg.CollisionPortCount) > 65536 {
		return nil, fmt.Errorf("collision port range %d+%d goes past 65535", cfg.CollisionPortMin, cfg.CollisionPortCount)
	}
	if int(cfg.SNATPortMin)+int(cfg.SNATPortCount) > 65536 {
		return nil, fmt.Errorf("masquerade port range %d+%d goes past 65535; lower snatPortMin or the count", cfg.SNATPortMin, cfg.SNATPortCount)
	}
	if cfg.SNATTries > maxSNATTries {
		return nil, fmt.Errorf("masquerade port tries %d is above the datapath's bound %d", cfg.SNATTries, maxSNATTries)
	}
	if cfg.MasqAddr.IsValid() && !cfg.MasqAddr.Is4() {
		return nil, fmt.Errorf("masquerade address %s is not IPv4", cfg.MasqAddr)
	}
	if cfg.NodePortAddr.IsValid() && !cfg.NodePortAddr.Is4() {
		return nil, fmt.Errorf("NodePort SNAT address %s is not IPv4", cfg.NodePortAddr)
	}
	if !cfg.HairpinIP.Is4() {
		return nil, fmt.Errorf("hairpin address %s is not IPv4", cfg.HairpinIP)
	}
	if err := os.MkdirAll(cfg.PinRoot, 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory %s (is bpffs mounted at /sys/fs/bpf?): %w", cfg.PinRoot, err)
	}
	// MkdirAll leaves an existing directory's mode alone; the pins are the datapath's state.
	if err := os.Chmod(cfg.PinRoot, 0o700); err != nil {
		return nil, fmt.Errorf("chmod 0700 pin directory %s: %w", cfg.PinRoot, err)
	}
	fwd, missing, err := probeForwarding(cfg.Forwarding)
	if err != nil {
		return nil, err
	}
	if len(missing) > 0 {
		cfg.Logger.Info("kernel lacks BPF helpers for direct forwarding; those packets go through the stack",
			zap.Strings("missing", missing), zap.Bool("peer", fwd.Peer), zap.Bool("neigh", fwd.Neigh))
	}
	spec, vars, sizes, err := podSpec(cfg, fwd)
	if err != nil {
		return nil, err
	}

	d := &Datapath{cfg: cfg, fwd: fwd}
	// A pinned map this build cannot reuse (an older layout, a changed size) is moved aside
	// rather than refused: the programs still attached keep it, and FinishUpgrade removes
	// it once they are replaced.
	moved, olds, err := moveAsideIncompatible(spec, cfg.PinRoot, cfg.Logger)
	if err != nil {
		return nil, err
	}
	d.moved = moved
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: cfg.PinRoot}}
	if err := spec.LoadAndAssign(&d.objs, opts); err != nil {
		d.restoreMoved(olds)
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("kernel verifier rejected the pod programs: %+v", ve)
		}
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			// Only a pin that appeared between the check and the load gets here.
			return nil, fmt.Errorf("a map pinned under %s changed while loading (another agent running?); "+
				"restart the agent: %w", cfg.PinRoot, err)
		}
		return nil, fmt.Errorf("load pod programs: %w", err)
	}
	// The netdev object after the pod object: every map it pins is one the pod object
	// declares too (TestNetdevMapsAreThePodObjects), so it finds them pinned, compatible,
	// and shares them.
	if err := loadNetdev(&d.netdev, opts, vars, sizes); err != nil {
		d.objs.Close()
		d.restoreMoved(olds)
		return nil, err
	}
	d.upgradeOnLoad(olds)
	cfg.Logger.Info("datapath loaded", zap.String("pinRoot", cfg.PinRoot),
		zap.Bool("redirectPeer", fwd.Peer), zap.Bool("redirectNeigh", fwd.Neigh))
	return d, nil
}

// podSpec is the pod object as Load loads it: the load-time variables and map sizes of cfg
// (defaults filled in) set. It also returns them, for the netdev object (a shared map must
// have one size in both). The verifier budget test loads the same spec.
func podSpec(cfg Config, fwd ForwardSupport) (*ebpf.CollectionSpec, map[string]any, map[string]uint32, error) {
	spec, err := LoadPod()
	if err != nil {
		return nil, nil, nil, fmt.Errorf("parse embedded pod BPF object: %w", err)
	}
	skip, err := cfg.snatSkip()
	if err != nil {
		return nil, nil, nil, err
	}
	vars := map[string]any{
		PodVarCFG_HAIRPIN_IP:                 AddrToBE(cfg.HairpinIP),
		PodVarCFG_CT_TCP_SYN_TIMEOUT:         seconds(cfg.CTTCPSynTimeout),
		PodVarCFG_CT_TCP_ESTABLISHED_TIMEOUT: seconds(cfg.CTTCPEstablishedTimeout),
		PodVarCFG_CT_TCP_CLOSING_TIMEOUT:     seconds(cfg.CTTCPClosingTimeout),
		PodVarCFG_CT_UDP_TIMEOUT:             seconds(cfg.CTUDPTimeout),
		PodVarCFG_COLLISION_PORT_MIN:         cfg.CollisionPortMin,
		PodVarCFG_COLLISION_PORT_COUNT:       cfg.CollisionPortCount,
		PodVarCFG_FORWARD:                    fwd.bits(),
		PodVarCFG_BW_EDT:                     boolByte(cfg.BandwidthEDT),
		PodVarCFG_MASQ_ADDR:                  uint32(0),
		PodVarCFG_MASQ_IFINDEX:               uint32(cfg.MasqIfindex),
		PodVarCFG_SNAT_PORT_MIN:              cfg.SNATPortMin,
		PodVarCFG_SNAT_PORT_COUNT:            cfg.SNATPortCount,
		PodVarCFG_SNAT_TRIES:                 cfg.SNATTries,
		PodVarCFG_SNAT_SKIP_MIN:              skip.Min,
		PodVarCFG_SNAT_SKIP_COUNT:            skip.count(),
		PodVarCFG_POLICY_EVENTS_ALLOWED:      boolByte(cfg.PolicyAllowedEvents),
		PodVarCFG_NODEPORT_ADDR:              uint32(0),
	}
	if cfg.MasqAddr.IsValid() {
		vars[PodVarCFG_MASQ_ADDR] = AddrToBE(cfg.MasqAddr)
	}
	if cfg.NodePortAddr.IsValid() {
		vars[PodVarCFG_NODEPORT_ADDR] = AddrToBE(cfg.NodePortAddr)
	}
	sizes := map[string]uint32{
		PodMapTernServices:  cfg.MaxServices,
		PodMapTernBackends:  cfg.MaxBackends,
		PodMapTernLbMembers: cfg.MaxBackends,
		PodMapTernConntrack: cfg.MaxFlows,
		PodMapTernSnat:      cfg.MaxSNATFlows,
		// External clients' flows to remote backends: sized like the masquerade flows.
		PodMapTernNodeportSnat: cfg.MaxSNATFlows,
		// Only frontends with affinity or Maglev have options, and the map is not
		// preallocated: it keeps its default size unless there may be more frontends, so
		// that resizing the frontends does not move it as well.
		PodMapTernLbSvcOpts:   max(cfg.MaxServices, spec.Maps[PodMapTernLbSvcOpts].MaxEntries),
		PodMapTernLbAffinity:  cfg.MaxAffinity,
		PodMapTernLbMaglev:    cfg.MaxMaglevBlocks,
		PodMapTernPolicyCidrs: cfg.MaxPolicyCIDRs,
	}
	if err := configureSpec(spec, vars, sizes); err != nil {
		return nil, nil, nil, err
	}
	return spec, vars, sizes, nil
}

// restoreMoved puts pins moved aside back after a failed load, so the next attempt finds
// the node as it was.
func (d *Datapath) restoreMoved(olds []*ebpf.Map) {
	for i, mv := range d.moved {
		orig := filepath.Join(d.cfg.PinRoot, mv.name)
		// A failed load may have pinned its new map there already.
		if err := os.Remove(orig); err != nil && !errors.Is(err, os.ErrNotExist) {
			d.cfg.Logger.Warn("could not remove a new map pin after a failed load", zap.String("pin", orig), zap.Error(err))
		}
		if err := movePin(olds[i], mv.pin, orig); err != nil {
			d.cfg.Logger.Warn("could not move a map pin back after a failed load", zap.String("pin", mv.pin), zap.Error(err))
		}
		if olds[i] != nil {
			olds[i].Close()
		}
	}
	d.moved = nil
}

func seconds(d time.Duration) uint32 { return uint32(d / time.Second) }

func boolByte(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// maxSNATTries is SNAT_MAX_TRIES in bpf/lib/portclaim.h: the bpf_loop bound.
const maxSNATTries = 256

// configureSpec sets the load-time variables and map sizes an object declares (the pod and
// netdev objects share most of them; a shared map must have one size in both).
func configureSpec(spec *ebpf.CollectionSpec, vars map[string]any, sizes map[string]uint32) error {
	for name, v := range vars {
		vs, ok := spec.Variables[name]
		if !ok {
			continue
		}
		if err := vs.Set(v); err != nil {
			return fmt.Errorf("set load-time variable %s: %w", name, err)
		}
	}
	for name, n := range sizes {
		if ms, ok := spec.Maps[name]; ok && n != 0 {
			ms.MaxEntries = n
		}
	}
	return nil
}

// Config returns the configuration the datapath was loaded with, defaults filled in.
func (d *Datapath) Config() Config { return d.cfg }

// FromPod and ToPod are the programs for the host side of a pod veth.
func (d *Datapath) FromPod() *ebpf.Program { return d.objs.TernFromPod }
func (d *Datapath) ToPod() *ebpf.Program   { return d.objs.TernToPod }

// Maps gives typed access to the datapath's maps.
func (d *Datapath) Maps() *Maps {
	return &Maps{
		Services:     d.objs.TernServices,
		Backends:     d.objs.TernBackends,
		Members:      d.objs.TernLbMembers,
		Opts:         d.objs.TernLbSvcOpts,
		Affinity:     d.objs.TernLbAffinity,
		Maglev:       d.objs.TernLbMaglev,
		Endpoints:    d.objs.TernEndpoints,
		IPCache:      d.objs.TernIpcache,
		CT:           d.objs.TernConntrack,
		Metrics:      d.objs.TernMetrics,
		Bandwidth:    d.objs.TernBandwidth,
		SNAT:         d.objs.TernSnat,
		NonMasq:      d.objs.TernNonmasq,
		SNATStats:    d.objs.TernSnatStats,
		SrcRanges:    d.objs.TernLbSrcRanges,
		NodePortSNAT: d.objs.TernNodeportSnat,
	}
}

// FragsForTest is the fragment map, for tests that check what it holds.
func (d *Datapath) FragsForTest() *ebpf.Map { return d.objs.TernFrags }

// Close releases this process's handles. Pinned maps and attached programs stay in the
// kernel: the datapath keeps forwarding while the agent is away.
func (d *Datapath) Close() error {
	if d.v1CT != nil {
		d.v1CT.Close()
		d.v1CT = nil
	}
	return errors.Join(d.netdev.Close(), d.objs.Close())
}

// RemovePins deletes everything tern pinned under root: maps, links (which detaches tcx
// programs) and the directory itself. It is for tests and for `ternctl reset`; an agent
// never calls it.
func RemovePins(root string) error {
	if root == "" || root == "/" {
		return fmt.Errorf("refusing to remove pin root %q", root)
	}
	return os.RemoveAll(filepath.Clean(root))
}
