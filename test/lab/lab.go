//go:build linux

// Package lab brings up a small Alibaba Cloud VPC made of real parts on one machine: a VPC
// router namespace, one namespace per node (an ECS instance of the emulator, whose ENIs the
// emulator's NetnsSDN plugs in as veths), a real tern-agent process per node running inside
// its node namespace and reaching the emulator through nsbridge on 127.0.0.1, and pods created
// by calling the real tern-cni binary through libcni, as containerd does.
//
// The root namespace is never a node: it reaches the lab only through loopback (the emulator)
// and unix sockets (the agents). Down removes every namespace, process, pin, socket and
// directory the lab made. Tests, cmd/tern-lab and `make demo` share this API.
package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/trunk"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/k8s/nsbridge"
)

// Names of the lab's cloud.
const (
	Zone          = "cn-hangzhou-h"
	NodeVSwitch   = "vsw-lab-nodes" // 192.168.0.0/24: the nodes' primary ENIs
	PodVSwitch    = "vsw-lab-pods"  // 192.168.16.0/20: pod addresses by default
	ClusterID     = "lab"
	SecurityGroup = "sg-test"
	NetworkName   = "tern"
	// DefaultInstanceType holds 3 ENIs × 10 = 30 pods per node.
	DefaultInstanceType = "ecs.g7.xlarge"
)

// LaggingListing is the listing lag the fault and crash tests run with: an assigned address
// shows in DescribeNetworkInterfaces 500 ms after the call, an unassigned one lingers 1 s, a
// status change shows 200 ms late, and DescribeRouteEntryList shows the route table as it was
// 1 s ago. The real API promises no read-after-write consistency.
var LaggingListing = ecsemu.ListingLag{Assigned: ecsemu.Duration(500 * time.Millisecond),
	Unassigned: ecsemu.Duration(time.Second), Status: ecsemu.Duration(200 * time.Millisecond), Routes: ecsemu.Duration(time.Second)}

// ENIConf is the part of eni_conf the lab lets callers choose.
type ENIConf struct {
	VSwitches   []string // pod vSwitches of Zone; default [PodVSwitch]
	MinPoolSize int
	MaxPoolSize int // default 5
	// ServiceCIDR is eni_conf's service_cidr (exclusive-ENI pods route it through their veth).
	ServiceCIDR string
	// EnableENITrunking is eni_conf's enable_eni_trunking (member ENIs; needs TrunkENIs).
	EnableENITrunking bool
}

// Options configure Up.
type Options struct {
	Nodes        int    // default 2
	InstanceType string // default DefaultInstanceType
	// TrunkENIs, when set, makes the emulator's InstanceType support ENI trunking with this
	// EniTotalQuantity (members = TrunkENIs − EniQuantity).
	TrunkENIs int
	// BinDir holds the tern-agent and tern-cni binaries (see BuildBinaries). Required.
	BinDir string
	// Dir is the lab's working directory (configs, stores, sockets, logs); default a new
	// temporary directory. Down removes it either way.
	Dir string
	// ENIConf is every node's initial eni_conf.
	ENIConf ENIConf
	// ExtraVSwitches are added to the VPC (e.g. a tiny one to exhaust, or a spare).
	ExtraVSwitches []ecsemu.VSwitchConfig
	// Latency is added to every emulated API call.
	Latency time.Duration
	// ListingLag makes the emulator's DescribeNetworkInterfaces and DescribeRouteEntryList lag
	// behind the calls that change ENIs and routes, as the real API may (zero: no lag).
	ListingLag ecsemu.ListingLag
	// Delays of the emulator's ENI transitions; zero fields take the lab's defaults (attach
	// and detach 20 ms, delete 10 ms).
	Delays ecsemu.TransitionDelays
	// Seed makes the emulator's fault injection reproducible (0: random).
	Seed uint64
	// Faults are injected before the agents start, so their start-up sees them too.
	Faults []ecsemu.Fault
	// AllocateWait is how long the agent lets one CNI ADD wait for a refill (default 5s).
	AllocateWait time.Duration
	// Logger receives the lab's own logs and the emulator's (nil: none). Agents log to files.
	Logger *zap.Logger
	// PinRoot is the bpffs directory under which every node pins its datapath; default
	// /sys/fs/bpf/tern-lab-<random>. A daemon sets it to record it before Up, so that a
	// later clean-up finds the pins even if the daemon died.
	PinRoot string

	// Kubernetes also runs a control plane (etcd, kube-apiserver, kube-controller-manager)
	// on the root namespace's loopback, registers a Node per lab node, bridges the
	// apiserver into every node namespace and gives each agent a kubeconfig, so that the
	// agents load-balance Services and report their Nodes. Pods then come from RunPod.
	Kubernetes bool
	// KubernetesBinDir holds etcd, kube-apiserver and kube-controller-manager; empty means
	// controlplane.BinDir() (test/k8s/build.sh's directory).
	KubernetesBinDir string
	// AgentKubeconfig, when set, gives a node's agent its kubeconfig path instead of the
	// admin one, e.g. one with a ServiceAccount token to prove an RBAC role (test/deploy).
	// It runs once per node after the control plane is up and before any agent starts.
	AgentKubeconfig func(ctx context.Context, l *Lab, n *Node) (string, error)
	// AgentCapabilities, when set, runs every agent with only these capabilities (names as
	// in a Pod's securityContext: "NET_ADMIN", "BPF", ...), the way a container runtime runs
	// a container that drops ALL and adds them: the agent still runs as uid 0, but with its
	// bounding set (hence its permitted and effective sets) cut to the list, through
	// util-linux setpriv. Empty runs it with every capability, like a privileged container.
	AgentCapabilities []string
	// DeferAgents leaves every node's agent unstarted: the test prepares the cluster (a
	// fresh node joining a cluster that already has Services, say) and then starts them with
	// Node.StartAgent or Node.LaunchAgent.
	DeferAgents bool
	// Timing is the emulator's: "" or ecsemu.TimingFast (the lab's short but asynchronous
	// delays), or ecsemu.TimingRealistic (ecsemu.RealisticTiming for every delay, lag and the
	// latency that Delays, ListingLag and Latency leave zero; the agents then poll the cloud
	// at the client's default interval instead of the lab's 10 ms). The benchmark uses it.
	Timing string
	// DaemonMode is every agent's daemonMode: "" (ENIIP) or agent.ModeVPC (route mode:
	// node i owns RoutePodCIDR(i), on its Node's spec.podCIDR with Kubernetes — the lab
	// plays kube-controller-manager's node IPAM — or in its config without).
	DaemonMode string
	// AgentConfig, when set, adjusts each node's agent configuration before it is written
	// (small datapath maps for the map-full tests, masquerade, ...).
	AgentConfig func(n *Node, c *agent.Config)
	// SocketLB turns socket-level load balancing on in every agent, each attached to a cgroup
	// of its node's own, <cgroup v2 root>/tern-lab-<random>/<node name> (Node.Cgroup), never
	// to a cgroup the lab did not create. A process started there (internal/sockclient) in
	// the node's namespace is a host-network client of that node.
	SocketLB bool
	// ExternalProxy leaves Services to another proxy (the real kube-proxy, StartKubeProxy):
	// the agents get no kubeconfig, so they serve IPAM and pod networking only, and forward
	// pod traffic through the kernel stack ("stack"), where kube-proxy's iptables or
	// nftables rules see it (the default "redirect" would bypass netfilter between local
	// pods). It needs Kubernetes.
	ExternalProxy bool
}

// Lab is a running lab. Its methods are safe for concurrent use.
type Lab struct {
	opts    Options
	log     *zap.Logger
	dir     string
	pinRoot string
	cgroup  string // Options.SocketLB: the lab's cgroup, parent of the nodes'
	vpc     netns.NsHandle
	// external hosts' namespaces (AddExternalHost), closed by Down
	externalHosts []netns.NsHandle
	sdn           *ecsemu.NetnsSDN
	emu           *ecsemu.Emulator
	srv           *http.Server
	emuAddr       string
	nodes         []*Node
	kube          *kubeParts // nil unless Options.Kubernetes

	mu       sync.Mutex
	pods     map[string]*Pod // by namespace/name
	external *External       // ExternalClient, made on first use
}

// BuildBinaries builds tern-agent and tern-cni into dir with the go tool; run it from inside
// the module (tests do).
func BuildBinaries(ctx context.Context, dir string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+string(filepath.Separator),
		"github.com/tern-net/tern/cmd/tern-agent", "github.com/tern-net/tern/cmd/tern-cni")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("go build tern-agent and tern-cni into %s: %w\n%s", dir, err, out)
	}
	return nil
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Up builds the lab and waits until every node's agent is ready (unless DeferAgents). On error everything made so
// far is removed.
func Up(ctx context.Context, o Options) (_ *Lab, err error) {
	if o.Nodes <= 0 {
		o.Nodes = 2
	}
	if o.InstanceType == "" {
		o.InstanceType = DefaultInstanceType
	}
	if o.ENIConf.MaxPoolSize == 0 {
		o.ENIConf.MaxPoolSize = 5
	}
	if len(o.ENIConf.VSwitches) == 0 {
		o.ENIConf.VSwitches = []string{PodVSwitch}
	}
	if o.AllocateWait == 0 {
		o.AllocateWait = 5 * time.Second
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.ExternalProxy && !o.Kubernetes {
		return nil, errors.New("lab: ExternalProxy needs Kubernetes (the external proxy watches the lab's apiserver)")
	}
	for _, b := range []string{"tern-agent", "tern-cni"} {
		if _, err := os.Stat(filepath.Join(o.BinDir, b)); err != nil {
			return nil, fmt.Errorf("lab: %s not found in BinDir %q (build it with lab.BuildBinaries): %w", b, o.BinDir, err)
		}
	}
	l := &Lab{opts: o, log: o.Logger, pods: map[string]*Pod{}}
	defer func() {
		if err != nil {
			l.Down()
		}
	}()
	if o.Dir != "" {
		l.dir = o.Dir
		if err := os.MkdirAll(l.dir, 0o700); err != nil {
			return nil, fmt.Errorf("lab: create %s: %w", l.dir, err)
		}
	} else if l.dir, err = os.MkdirTemp("", "tern-lab-"); err != nil {
		return nil, fmt.Errorf("lab: create work directory: %w", err)
	}
	l.pinRoot = o.PinRoot
	if l.pinRoot == "" {
		l.pinRoot = filepath.Join("/sys/fs/bpf", "tern-lab-"+randHex(4))
	}

	if o.SocketLB {
		root, err := loader.CgroupV2Root()
		if err != nil {
			return nil, fmt.Errorf("lab: socket LB: %w", err)
		}
		cg := filepath.Join(root, "tern-lab-"+randHex(4))
		if err := os.Mkdir(cg, 0o755); err != nil {
			return nil, fmt.Errorf("lab: create cgroup %s: %w", cg, err)
		}
		l.cgroup = cg
	}
	// Dead labs' pins first (sweep.go), then this lab's owner record, before any agent pins.
	l.sweepStale()
	if err := recordOwner(l.pinRoot, l.cgroup); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	if l.vpc, err = nsutil.NewAnon(); err != nil {
		return nil, fmt.Errorf("lab: VPC namespace: %w", err)
	}
	cfg := l.cloudConfig()
	nodeNS := map[string]netns.NsHandle{}
	for i := range o.Nodes {
		ns, err := nsutil.NewAnon()
		if err != nil {
			return nil, fmt.Errorf("lab: namespace of node %d: %w", i, err)
		}
		n := &Node{lab: l, Index: i, Name: fmt.Sprintf("node-%d", i+1), InstanceID: fmt.Sprintf("i-lab-%04d", i+1),
			PrimaryIP: nodePrimaryIP(i), NS: ns}
		n.dir = filepath.Join(l.dir, n.Name)
		l.nodes = append(l.nodes, n)
		if l.cgroup != "" {
			if err := os.Mkdir(n.Cgroup(), 0o755); err != nil {
				return nil, fmt.Errorf("lab: create cgroup %s: %w", n.Cgroup(), err)
			}
		}
		nodeNS[n.InstanceID] = ns
	}
	if l.sdn, err = ecsemu.NewNetnsSDN(l.vpc, nodeNS, o.Logger.Named("sdn")); err != nil {
		return nil, fmt.Errorf("lab: SDN: %w", err)
	}
	eopts := []ecsemu.Option{ecsemu.WithSDN(l.sdn), ecsemu.WithLogger(o.Logger.Named("emulator"))}
	if o.Seed != 0 {
		eopts = append(eopts, ecsemu.WithSeed(o.Seed))
	}
	if l.emu, err = ecsemu.New(cfg, eopts...); err != nil {
		return nil, fmt.Errorf("lab: emulator: %w", err)
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("lab: emulator listener: %w", err)
	}
	l.emuAddr = ln.Addr().String()
	l.srv = &http.Server{Handler: l.emu.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = l.srv.Serve(ln) }()

	if o.Kubernetes {
		// Before the nodes are prepared: their agent configs name the kubeconfig.
		if err := l.startKubernetes(ctx); err != nil {
			return nil, err
		}
		if err := l.serveAPIServerInVPC(ctx); err != nil {
			return nil, err
		}
		if o.AgentKubeconfig != nil {
			for _, n := range l.nodes {
				if n.kubeconfig, err = o.AgentKubeconfig(ctx, l, n); err != nil {
					return nil, fmt.Errorf("lab: kubeconfig for the agent of %s: %w", n.Name, err)
				}
			}
		}
	}
	for _, n := range l.nodes {
		if err := n.prepare(); err != nil {
			return nil, err
		}
	}
	if o.Timing != ecsemu.TimingRealistic || o.Latency != 0 {
		l.emu.SetLatency(o.Latency)
	}
	for _, f := range o.Faults {
		l.emu.InjectFault(f)
	}
	for _, n := range l.nodes {
		if o.DeferAgents {
			break
		}
		if err := n.StartAgent(ctx); err != nil {
			return nil, err
		}
	}
	l.log.Info("lab up", zap.String("dir", l.dir), zap.Int("nodes", len(l.nodes)), zap.String("emulator", l.emuAddr))
	return l, nil
}

func (l *Lab) cloudConfig() *ecsemu.Config {
	base := ecsemu.TestConfig()
	cfg := &ecsemu.Config{
		RegionID: ecsemu.TestRegion,
		VPC:      ecsemu.VPCConfig{ID: "vpc-lab", CIDR: "192.168.0.0/16"},
		VSwitches: append([]ecsemu.VSwitchConfig{
			{ID: NodeVSwitch, Zone: Zone, CIDR: "192.168.0.0/24"},
			{ID: PodVSwitch, Zone: Zone, CIDR: "192.168.16.0/20"},
		}, l.opts.ExtraVSwitches...),
		SecurityGroups: []string{SecurityGroup},
		InstanceTypes:  base.InstanceTypes,
		AccessKeys:     base.AccessKeys,
		// The lab keeps every transition short but asynchronous (realistic timing is the
		// benchmark's, test/bench/cni -timing realistic).
		Timing: ecsemu.TimingFast,
		Delays: ecsemu.TransitionDelays{Attach: ecsemu.Duration(20 * time.Millisecond), Detach: ecsemu.Duration(20 * time.Millisecond),
			Delete: ecsemu.Duration(10 * time.Millisecond), Metadata: l.opts.Delays.Metadata,
			Route: ecsemu.Duration(50 * time.Millisecond), RouteDelete: ecsemu.Duration(20 * time.Millisecond)},
		ListingLag: l.opts.ListingLag,
	}
	if l.opts.TrunkENIs > 0 {
		cfg.InstanceTypes = slices.Clone(cfg.InstanceTypes)
		cfg.SetTrunking(l.opts.InstanceType, l.opts.TrunkENIs)
	}
	if l.opts.Timing == ecsemu.TimingRealistic {
		cfg.Timing = ecsemu.TimingRealistic
		cfg.Delays = l.opts.Delays // zero fields take RealisticTiming's
		return l.addInstances(cfg)
	}
	if d := l.opts.Delays; d.Route != 0 {
		cfg.Delays.Route = d.Route
	}
	if d := l.opts.Delays; d.RouteDelete != 0 {
		cfg.Delays.RouteDelete = d.RouteDelete
	}
	if d := l.opts.Delays; d.Attach != 0 {
		cfg.Delays.Attach = d.Attach
	}
	if d := l.opts.Delays; d.Detach != 0 {
		cfg.Delays.Detach = d.Detach
	}
	if d := l.opts.Delays; d.Delete != 0 {
		cfg.Delays.Delete = d.Delete
	}
	return l.addInstances(cfg)
}

func (l *Lab) addInstances(cfg *ecsemu.Config) *ecsemu.Config {
	for i := range l.opts.Nodes {
		cfg.AddInstance(fmt.Sprintf("i-lab-%04d", i+1), l.opts.InstanceType, NodeVSwitch, nodePrimaryIP(i))
	}
	return cfg
}

// Emulator is the lab's cloud.
func (l *Lab) Emulator() *ecsemu.Emulator { return l.emu }

// EmulatorAddr is the emulator's host:port on the root namespace's (and every node's) loopback.
func (l *Lab) EmulatorAddr() string { return l.emuAddr }

// RoutePodCIDR is node i's pod CIDR in the VPC route mode: inside the VPC, outside every
// vSwitch (the cloud refuses a route that overlaps one).
func RoutePodCIDR(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{192, 168, byte(128 + i), 0}), 24)
}

// RouteMode reports whether the lab's agents run the VPC route mode.
func (l *Lab) RouteMode() bool { return l.opts.DaemonMode == agent.ModeVPC }

// nodePrimaryIP is the address of node i's primary ENI on NodeVSwitch.
func nodePrimaryIP(i int) string { return fmt.Sprintf("192.168.0.%d", 10+i) }

// PinRoot is the bpffs directory holding every node's pins (one subdirectory per node).
func (l *Lab) PinRoot() string { return l.pinRoot }

// Dir is the lab's working directory.
func (l *Lab) Dir() string { return l.dir }

// Nodes lists the nodes.
func (l *Lab) Nodes() []*Node { return l.nodes }

// Node returns node i (0-based).
func (l *Lab) Node(i int) *Node { return l.nodes[i] }

// Pods lists the live pods, sorted by namespace/name.
func (l *Lab) Pods() []*Pod {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]*Pod, 0, len(l.pods))
	for _, p := range l.pods {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key() < out[j].Key() })
	return out
}

// GC runs CNI GC on every node through libcni, with the live pods as valid attachments.
func (l *Lab) GC(ctx context.Context) error {
	var errs []error
	for _, n := range l.nodes {
		valid := []types.GCAttachment{} // an empty list, never a missing one
		for _, p := range l.Pods() {
			if p.Node == n {
				valid = append(valid, types.GCAttachment{ContainerID: p.ContainerID, IfName: "eth0"})
			}
		}
		if err := n.gc(ctx, valid); err != nil {
			errs = append(errs, fmt.Errorf("CNI GC on %s: %w", n.Name, err))
		}
	}
	return errors.Join(errs...)
}

// Down stops the agents and removes everything the lab made. It is safe to call on a partly
// built lab and more than once.
func (l *Lab) Down() error {
	var errs []error
	// Agents first, while the apiserver still answers: they shut their watches down cleanly.
	for _, n := range l.nodes {
		if err := n.StopAgent(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := l.stopKubernetes(); err != nil {
		errs = append(errs, err)
	}
	for _, n := range l.nodes {
		n.closeLauncher()
		for _, b := range []**nsbridge.Bridge{&n.bridge, &n.apiBridge} {
			if *b != nil {
				_ = (*b).Close()
				*b = nil
			}
		}
	}
	l.mu.Lock()
	for k, p := range l.pods {
		p.stopServers()
		p.ns.Close()
		delete(l.pods, k)
	}
	if l.external != nil {
		l.external.ns.Close() // its link goes with the namespace
		l.external = nil
	}
	l.mu.Unlock()
	if l.srv != nil {
		_ = l.srv.Close()
		l.srv = nil
	}
	if l.emu != nil {
		if err := l.emu.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close emulator: %w", err))
		}
		l.emu = nil
	}
	if l.sdn != nil {
		if err := l.sdn.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close SDN: %w", err))
		}
		l.sdn = nil
	}
	for _, n := range l.nodes {
		if n.NS.IsOpen() {
			n.NS.Close()
		}
	}
	for _, ns := range l.externalHosts {
		ns.Close()
	}
	l.externalHosts = nil
	if l.vpc.IsOpen() {
		l.vpc.Close()
	}
	if l.pinRoot != "" {
		if err := loader.RemovePins(l.pinRoot); err != nil {
			errs = append(errs, fmt.Errorf("remove pins %s: %w", l.pinRoot, err))
		}
		l.pinRoot = ""
	}
	if l.cgroup != "" {
		// After the pins: the socket hooks' links are gone, and every process the tests
		// started in these cgroups has been waited for by its test.
		for _, n := range l.nodes {
			if err := os.Remove(n.Cgroup()); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove cgroup of %s: %w", n.Name, err))
			}
		}
		if err := os.Remove(l.cgroup); err != nil {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", l.cgroup, err))
		}
		l.cgroup = ""
	}
	if l.dir != "" {
		if err := os.RemoveAll(l.dir); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", l.dir, err))
		}
		l.dir = ""
	}
	return errors.Join(errs...)
}

// CheckCloudMatchesAgents compares the emulator with every agent's pool: each ENI tagged for
// a node is attached to that node's instance and holds exactly the addresses the agent holds
// (its primary included, which serves a pod too); the agent knows no ENI the cloud lacks; no tern ENI is left detached; no
// address is allocated twice across the lab. It returns every difference found.
func (l *Lab) CheckCloudMatchesAgents(ctx context.Context) error {
	if l.RouteMode() {
		return l.checkRoutesMatchAgents(ctx)
	}
	s := l.emu.Snapshot()
	var errs []error
	seen := map[string]string{}
	byNode := map[string]*Node{}
	for _, n := range l.nodes {
		byNode[n.Name] = n
	}
	exclusive := map[string]ecsemu.ENIState{} // exclusive ENIs (tern.io/kind=eni) by ID
	for _, e := range s.ENIs {
		if e.Tags[ipam.TagCreator] != ipam.TagCreatorTern || e.Tags[trunk.TagRole] != "" {
			continue // trunk and member ENIs: checkTrunkMatchesAgents
		}
		if e.Tags[ipam.TagKind] != "" {
			exclusive[e.ID] = e
		}
		n, ok := byNode[e.Tags[ipam.TagNode]]
		if !ok || e.Status != aliyun.StatusInUse || e.InstanceID != n.InstanceID {
			errs = append(errs, fmt.Errorf("cloud ENI %s (node tag %q) is %s on %q: leaked", e.ID, e.Tags[ipam.TagNode], e.Status, e.InstanceID))
		}
	}
	for _, n := range l.nodes {
		st, err := n.Client().State(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("state of %s's agent: %w", n.Name, err))
			continue
		}
		agentENIs := map[string]api.ENIState{}
		for _, e := range st.ENIs {
			agentENIs[e.ID] = e
		}
		for k, a := range st.Allocations {
			if a.Kind != api.KindENI {
				continue
			}
			e, ok := exclusive[a.ENI.ID]
			if !ok || e.Tags[ipam.TagNode] != n.Name || e.PrimaryIP != a.IP || len(e.IPs) != 1 {
				errs = append(errs, fmt.Errorf("%s: pod %s holds exclusive ENI %s (%s), the cloud has %+v", n.Name, k, a.ENI.ID, a.IP, e))
			}
			delete(exclusive, a.ENI.ID)
		}
		for _, e := range s.ENIs {
			if e.Tags[ipam.TagCreator] != ipam.TagCreatorTern || e.Tags[ipam.TagNode] != n.Name || e.Tags[ipam.TagKind] != "" {
				continue
			}
			ae, ok := agentENIs[e.ID]
			if !ok {
				errs = append(errs, fmt.Errorf("%s: cloud ENI %s with %d IPs is unknown to the agent: leaked", n.Name, e.ID, len(e.IPs)))
				continue
			}
			cloud := append([]string(nil), e.IPs...)
			sort.Strings(cloud)
			if fmt.Sprint(cloud) != fmt.Sprint(ae.IPs) {
				errs = append(errs, fmt.Errorf("%s: ENI %s: cloud has %v, agent has %v", n.Name, e.ID, cloud, ae.IPs))
			}
			delete(agentENIs, e.ID)
		}
		for id := range agentENIs {
			errs = append(errs, fmt.Errorf("%s: the agent holds ENI %s that the cloud does not list for the node", n.Name, id))
		}
		for k, a := range st.Allocations {
			if prev, dup := seen[a.IP]; dup {
				errs = append(errs, fmt.Errorf("IP %s allocated twice: %s and %s/%s", a.IP, prev, n.Name, k))
			}
			seen[a.IP] = n.Name + "/" + k
		}
	}
	for id, e := range exclusive {
		errs = append(errs, fmt.Errorf("cloud exclusive ENI %s (pod tag %q, node %q) is held by no pod: leaked", id, e.Tags[ipam.TagPod], e.Tags[ipam.TagNode]))
	}
	errs = append(errs, l.checkTrunkMatchesAgents(ctx, s))
	return errors.Join(errs...)
}

// checkRoutesMatchAgents is CheckCloudMatchesAgents for the VPC route mode: the route table
// holds exactly one Available entry per node, its pod CIDR to its instance; the cloud holds no
// tern ENI; every allocation is inside its node's pod CIDR and no address is given twice.
func (l *Lab) checkRoutesMatchAgents(ctx context.Context) error {
	s := l.emu.Snapshot()
	var errs []error
	want := map[string]string{}
	for _, n := range l.nodes {
		want[RoutePodCIDR(n.Index).String()] = n.InstanceID
	}
	got := map[string]string{}
	for _, r := range s.Routes {
		if r.Status != ecsemu.RouteStatusAvailable || !r.Installed {
			errs = append(errs, fmt.Errorf("route entry %s (%s → %s) is %s, installed %v", r.ID, r.Destination, r.NextHopID, r.Status, r.Installed))
		}
		if _, dup := got[r.Destination]; dup {
			errs = append(errs, fmt.Errorf("two route entries for %s", r.Destination))
		}
		got[r.Destination] = r.NextHopID
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		errs = append(errs, fmt.Errorf("route table %v, want %v", got, want))
	}
	for _, e := range s.ENIs {
		if e.Tags[ipam.TagCreator] == ipam.TagCreatorTern {
			errs = append(errs, fmt.Errorf("cloud ENI %s was created in route mode", e.ID))
		}
	}
	seen := map[string]string{}
	for _, n := range l.nodes {
		st, err := n.Client().State(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("state of %s's agent: %w", n.Name, err))
			continue
		}
		for k, a := range st.Allocations {
			if prev, dup := seen[a.IP]; dup {
				errs = append(errs, fmt.Errorf("IP %s allocated twice: %s and %s/%s", a.IP, prev, n.Name, k))
			}
			seen[a.IP] = n.Name + "/" + k
			if ip, err := netip.ParseAddr(a.IP); err != nil || !RoutePodCIDR(n.Index).Contains(ip) {
				errs = append(errs, fmt.Errorf("%s/%s holds %s, outside the node's pod CIDR %s", n.Name, k, a.IP, RoutePodCIDR(n.Index)))
			}
		}
	}
	return errors.Join(errs...)
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	// Write then rename, so a watcher never reads half a file.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	return os.Rename(tmp, path)
}

// agentConfig is what the lab writes for a node's agent.
func (n *Node) agentConfig() agent.Config {
	c := n.ternAgentConfig()
	if n.lab.opts.ExternalProxy {
		c.Kubeconfig = ""
		c.Forwarding = string(loader.ForwardStack)
	}
	return c
}

func (n *Node) ternAgentConfig() agent.Config {
	c := agent.Config{
		NodeName: n.Name, InstanceID: n.InstanceID, ClusterID: ClusterID,
		ENIConfigPath: n.eniConfPath(), ENIConfigPollInterval: agent.Duration(100 * time.Millisecond),
		CloudEndpoint: n.lab.emuAddr,
		Cloud: agent.CloudTuning{PollInterval: agent.Duration(10 * time.Millisecond), WaitTimeout: agent.Duration(30 * time.Second),
			BackoffInitial: agent.Duration(20 * time.Millisecond), BackoffMax: agent.Duration(500 * time.Millisecond), BackoffAttempts: 8,
			RateLimitPerSecond: 200},
		StatePath:        filepath.Join(n.dir, "ipam.db"),
		SandboxStatePath: filepath.Join(n.dir, "sandboxes.json"),
		SocketPath:       n.Socket(),
		PinRoot:          n.PinRoot(),
		AllocateWait:     agent.Duration(n.lab.opts.AllocateWait),
		MaintainInterval: agent.Duration(2 * time.Second),
		Kubeconfig:       n.kubeconfigPath(),
		MetricsAddr:      n.metricsAddr(),
		CNIConfDir:       n.AgentConfDir(),
		SocketLB:         agent.SocketLBConfig{Enabled: n.lab.cgroup != "", Cgroup: n.Cgroup()},
	}
	if n.lab.opts.Timing == ecsemu.TimingRealistic {
		c.Cloud.PollInterval = 0 // the client's default (500 ms), not a 10 ms poll of a seconds-long attach
	}
	if n.lab.RouteMode() {
		c.DaemonMode = agent.ModeVPC
		c.RouteCheckInterval = agent.Duration(500 * time.Millisecond)
		if c.Kubeconfig == "" {
			c.PodCIDR = RoutePodCIDR(n.Index).String()
		}
	}
	return c
}
