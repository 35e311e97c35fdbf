package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/bandwidth"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/service"
)

// Defaults of Config.
const (
	DefaultSocketPath    = api.DefaultSocketPath
	DefaultStatePath     = "/var/lib/tern/ipam.db"
	DefaultENIConfigPath = "/etc/eni/eni_conf"
	// DefaultSandboxStatePath records the attached sandboxes and their hostPorts
	// (agent/hostport.go).
	DefaultSandboxStatePath = "/var/lib/tern/sandboxes.json"
)

// Duration is a time.Duration that reads "500ms" or a number of seconds from JSON.
type Duration time.Duration

// UnmarshalJSON accepts a Go duration string or a number of seconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("duration %q: %w", s, err)
		}
		*d = Duration(v)
		return nil
	}
	var n float64
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("duration %s: want a string like \"500ms\" or a number of seconds", b)
	}
	*d = Duration(n * float64(time.Second))
	return nil
}

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// CloudTuning adjusts the cloud client; zero fields keep ipam/aliyun's defaults. The lab uses
// it to poll and retry faster than a real cloud warrants.
type CloudTuning struct {
	PollInterval    Duration `json:"pollInterval,omitempty"`
	WaitTimeout     Duration `json:"waitTimeout,omitempty"`
	CallTimeout     Duration `json:"callTimeout,omitempty"`
	BackoffInitial  Duration `json:"backoffInitial,omitempty"`
	BackoffMax      Duration `json:"backoffMax,omitempty"`
	BackoffAttempts int      `json:"backoffAttempts,omitempty"`
	// RateLimitPerSecond, when set, replaces every per-action rate limit (burst = 2×).
	RateLimitPerSecond float64 `json:"rateLimitPerSecond,omitempty"`
}

// Config is the agent's configuration (the -config file of tern-agent, JSON).
type Config struct {
	// NodeName is the Kubernetes node name; it goes into the tags of the ENIs the node owns.
	NodeName string `json:"nodeName"`
	// InstanceID is this node's ECS instance. Empty: read from the instance metadata service.
	InstanceID string `json:"instanceID,omitempty"`
	// MetadataEndpoint is the instance metadata service (default http://100.100.100.200),
	// read for instanceID and, when neither this config nor eni_conf sets it, regionID.
	MetadataEndpoint string `json:"metadataEndpoint,omitempty"`
	// ClusterID scopes ENI tags to one cluster (default "default").
	ClusterID string `json:"clusterID,omitempty"`
	// ENIConfigPath is Terway's eni_conf (the eni-config ConfigMap key), reloaded on change.
	ENIConfigPath         string   `json:"eniConfigPath,omitempty"`
	ENIConfigPollInterval Duration `json:"eniConfigPollInterval,omitempty"`
	// RegionID overrides eni_conf's region_id.
	RegionID string `json:"regionID,omitempty"`
	// CloudEndpoint (host:port) sends every ECS/VPC call there, e.g. to the emulator.
	CloudEndpoint string      `json:"cloudEndpoint,omitempty"`
	Cloud         CloudTuning `json:"cloud,omitempty"`
	// StatePath is the IPAM store (bbolt).
	StatePath string `json:"statePath,omitempty"`
	// SocketPath is the CNI API's unix socket (mode 0600).
	SocketPath string `json:"socketPath,omitempty"`
	// SocketAllowedUIDs are the uids besides root (0) whose processes may use the socket;
	// the agent checks each connection's peer credentials (SO_PEERCRED) and closes the
	// others unanswered. The runtime runs the CNI plugin as root, so this is normally empty.
	SocketAllowedUIDs []uint32 `json:"socketAllowedUIDs,omitempty"`
	// PinRoot is the bpffs directory of the datapath (default /sys/fs/bpf/tern).
	PinRoot string `json:"pinRoot,omitempty"`
	// ForceClsact attaches pod programs with clsact even where tcx works.
	ForceClsact bool `json:"forceClsact,omitempty"`
	// Forwarding is "redirect" (default: pod traffic is redirected straight into local pods
	// and out of ENIs where the route allows and the kernel can) or "stack" (every packet
	// through the host stack).
	Forwarding string `json:"forwarding,omitempty"`
	// Datapath map sizes (0: the loader's defaults). They are fixed when a map is first
	// pinned; changing one later needs the pinned map removed, which drops its state.
	MaxServices uint32 `json:"maxServices,omitempty"`
	MaxBackends uint32 `json:"maxBackends,omitempty"`
	MaxFlows    uint32 `json:"maxFlows,omitempty"`
	// MaxAffinity sizes the sessionAffinity LRU (clients × frontends; default 65536) and
	// MaxMaglevBlocks the Maglev tables (16 entries a block; default 65536).
	MaxAffinity     uint32 `json:"maxAffinity,omitempty"`
	MaxMaglevBlocks uint32 `json:"maxMaglevBlocks,omitempty"`
	// MaxPolicyCIDRs sizes the map of NetworkPolicy ipBlock prefixes (cidr and except;
	// default 16384). Policies with more distinct prefixes do not fit: the previous rules
	// stay enforced and the Node gets a TernNetworkPolicyMapFull Event.
	MaxPolicyCIDRs uint32 `json:"maxPolicyCIDRs,omitempty"`
	// LBAlgorithm is the backend selection of Services without the
	// service.tern.io/lb-algorithm annotation (or Cilium's service.cilium.io/lb-algorithm):
	// "random" (the default, as kube-proxy) or "maglev".
	LBAlgorithm string `json:"lbAlgorithm,omitempty"`
	// MaglevTableSize fixes every Maglev table's size to one of service.MaglevPrimes (251 ...
	// 131071); 0 (the default) sizes each Service's table as the smallest of them at least
	// 100 times its backends.
	MaglevTableSize uint32 `json:"maglevTableSize,omitempty"`
	// MaxRevNAT sized the reverse-NAT index of the first datapath. Replies now find their
	// frontend in the flow's conntrack entry, so it is accepted and ignored, so that older
	// configurations keep loading.
	MaxRevNAT uint32 `json:"maxRevNAT,omitempty"`
	// CNIConfDir, when set (e.g. /etc/cni/net.d), is where the agent installs its conflist
	// once it is ready to serve the plugin, so the runtime only starts using tern-cni when an
	// agent answers. Empty: the operator installs it.
	CNIConfDir string `json:"cniConfDir,omitempty"`
	// MetricsAddr, when set, also serves /metrics on this TCP address (the socket always does).
	MetricsAddr string `json:"metricsAddr,omitempty"`
	// MetricsTLSCertFile and MetricsTLSKeyFile (PEM), set together, make metricsAddr serve
	// HTTPS. The files are read again when they change (a rotated certificate needs no
	// restart).
	MetricsTLSCertFile string `json:"metricsTLSCertFile,omitempty"`
	MetricsTLSKeyFile  string `json:"metricsTLSKeyFile,omitempty"`
	// MetricsAuth "kubernetes" requires a bearer token on metricsAddr's /metrics, checked
	// with a TokenReview and a SubjectAccessReview through Kubeconfig (see agent/metricsauth);
	// /healthz and /readyz stay open for the kubelet's probes. Empty: no authentication.
	MetricsAuth string `json:"metricsAuth,omitempty"`
	// PprofAddr, when set, serves Go's runtime profiles (/debug/pprof/) on this TCP address;
	// a bare port (":6060", "6060") listens on loopback only (agent/pprof.go). Empty: off.
	PprofAddr string `json:"pprofAddr,omitempty"`
	// Kubeconfig is for the Kubernetes-driven components; without it the agent is IPAM-only.
	Kubeconfig string `json:"kubeconfig,omitempty"`
	// NodeLabels stand for the Node's labels when there is no kubeconfig: they turn optional
	// network resource kinds on (k8s.aliyun.com/exclusive-mode-eni-type: eniOnly). Ignored
	// with a kubeconfig (the Node's own labels count).
	NodeLabels map[string]string `json:"nodeLabels,omitempty"`
	// AllocateWait bounds how long one allocation waits for a refill before answering
	// "try again later" (default 10s).
	AllocateWait Duration `json:"allocateWait,omitempty"`
	// MaintainInterval is the pool's background refill/reclaim period (default 10s).
	MaintainInterval Duration `json:"maintainInterval,omitempty"`
	// ListingGrace is how long the cloud's listings (DescribeNetworkInterfaces,
	// DescribeRouteEntryList) may lag behind the calls that change what they list before the
	// agent acts on a difference (default 10s; agent/listinggrace.go).
	ListingGrace Duration `json:"listingGrace,omitempty"`
	// FixedIPHoldTime is how long the address of a deleted StatefulSet pod with
	// k8s.aliyun.com/pod-ip-fixed stays reserved for it (default 10m; docs/ipam.md).
	FixedIPHoldTime Duration `json:"fixedIPHoldTime,omitempty"`
	// ENILinkTimeout bounds the wait for an attached ENI's link to appear (default 10s).
	ENILinkTimeout Duration `json:"eniLinkTimeout,omitempty"`
	// SocketLB is socket-level load balancing (agent/socklb.go, docs/socket-lb.md).
	SocketLB SocketLBConfig `json:"socketLB,omitempty"`
	// BandwidthMode is how pod egress bandwidth limits are enforced: "auto" (default) uses
	// EDT where the kernel has the fq qdisc and the token-bucket policer where it has not;
	// "edt" or "policer" force one.
	BandwidthMode string `json:"bandwidthMode,omitempty"`
	// NetworkPolicy configures enforcement and audit mode (policyconfig.go).
	NetworkPolicy NetworkPolicyConfig `json:"networkPolicy,omitempty"`
	// DisableNetworkPolicy is Terway's spelling (its eni-config key disable_network_policy,
	// "true" or "false"); networkPolicy.enforce is the same switch the other way round.
	DisableNetworkPolicy *TerwayBool `json:"disable_network_policy,omitempty"`
	// Masquerade is eBPF source NAT of pod traffic leaving the VPC (agent/masquerade.go).
	Masquerade MasqueradeConfig `json:"masquerade,omitempty"`
	// DaemonMode is how pods get addresses, in Terway's spelling (its --daemon-mode):
	// "ENIMultiIP" (the default: secondary addresses of ENIs) or "VPC" (the node's pod CIDR,
	// routed to the node by a VPC route entry; docs/ipam.md "VPC route mode"). Case does not
	// matter; "eniip" and "vpc-route" are accepted too. Terway's "ENIOnly" is not built.
	DaemonMode string `json:"daemonMode,omitempty"`
	// PodCIDR is the node's pod CIDR in VPC mode when there is no kubeconfig; with one the
	// agent reads the Node's spec.podCIDR and this, if set, must agree.
	PodCIDR string `json:"podCIDR,omitempty"`
	// RouteTableID is the VPC route table of the VPC mode's entries; empty: the VPC's system
	// route table.
	RouteTableID string `json:"routeTableID,omitempty"`
	// RouteCheckInterval is how often VPC mode checks its route entry (and, on the node that
	// cleans up, the entries of departed Nodes); default 1m, jittered.
	RouteCheckInterval Duration `json:"routeCheckInterval,omitempty"`
	// IPAM chooses where pod addresses come from: tern's ENIIP pool, or none (chaining
	// mode, agent/modes.go).
	IPAM IPAMConfig `json:"ipam,omitempty"`
	// KubeProxyReplacement is Cilium's and Terway's kube-proxy-replacement (agent/modes.go).
	KubeProxyReplacement KubeProxyReplacement `json:"kube-proxy-replacement,omitempty"`
	// HostPort serves the CNI portMappings capability (agent/hostport.go).
	HostPort HostPortConfig `json:"hostPort,omitempty"`
	// SandboxStatePath is where the agent records the sandboxes tern-cni attached: their
	// host interface (DEL in chaining mode) and hostPorts, so a restarted agent keeps them.
	SandboxStatePath string `json:"sandboxStatePath,omitempty"`
}

// Daemon modes, in Terway's spelling.
const (
	ModeENIMultiIP = "ENIMultiIP"
	ModeVPC        = "VPC"
)

// Mode is the configured daemon mode, normalised to ModeENIMultiIP or ModeVPC; ok is false
// for a value the agent does not know.
func (c Config) Mode() (mode string, ok bool) {
	switch strings.ToLower(c.DaemonMode) {
	case "", "enimultiip", "eniip":
		return ModeENIMultiIP, true
	case "vpc", "vpc-route", "route":
		return ModeVPC, true
	}
	return "", false
}

// LoadConfig reads a JSON config file. Unknown fields are an error: a typo would otherwise
// silently keep a default.
func LoadConfig(path string) (Config, error) {
	var c Config
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("read agent config: %w", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return c, fmt.Errorf("parse agent config %s: %w", path, err)
	}
	return c, nil
}

func (c *Config) setDefaults() {
	if c.SandboxStatePath == "" {
		c.SandboxStatePath = DefaultSandboxStatePath
	}
	if c.SocketPath == "" {
		c.SocketPath = DefaultSocketPath
	}
	if c.IPAM.Off() {
		// No ENI defaults: validateModes reads a set ENI field as the operator's.
		return
	}
	if c.ClusterID == "" {
		c.ClusterID = "default"
	}
	if c.ENIConfigPath == "" {
		c.ENIConfigPath = DefaultENIConfigPath
	}
	if c.StatePath == "" {
		c.StatePath = DefaultStatePath
	}
	if c.ENILinkTimeout == 0 {
		c.ENILinkTimeout = Duration(10 * time.Second)
	}
}

// Validate reports every missing or wrong field at once.
func (c Config) Validate() error {
	var errs []error
	if c.NodeName == "" {
		errs = append(errs, errors.New("nodeName is required (the Kubernetes node name; it tags the node's ENIs)"))
	}
	for name, p := range map[string]string{"socketPath": c.SocketPath, "statePath": c.StatePath, "eniConfigPath": c.ENIConfigPath, "sandboxStatePath": c.SandboxStatePath} {
		if p != "" && !filepath.IsAbs(p) {
			errs = append(errs, fmt.Errorf("%s %q must be an absolute path", name, p))
		}
	}
	// The agent replaces whatever stale socket is at socketPath on start: the path must not be
	// one of the files it keeps.
	for name, p := range map[string]string{"statePath": c.StatePath, "eniConfigPath": c.ENIConfigPath, "kubeconfig": c.Kubeconfig, "sandboxStatePath": c.SandboxStatePath} {
		if c.SocketPath != "" && p != "" && filepath.Clean(c.SocketPath) == filepath.Clean(p) {
			errs = append(errs, fmt.Errorf("socketPath and %s are both %q: give the socket a path of its own (default %s)", name, p, DefaultSocketPath))
		}
	}
	for name, d := range map[string]Duration{
		"allocateWait": c.AllocateWait, "maintainInterval": c.MaintainInterval, "fixedIPHoldTime": c.FixedIPHoldTime, "eniLinkTimeout": c.ENILinkTimeout,
		"eniConfigPollInterval": c.ENIConfigPollInterval, "cloud.pollInterval": c.Cloud.PollInterval,
		"cloud.waitTimeout": c.Cloud.WaitTimeout, "cloud.callTimeout": c.Cloud.CallTimeout,
		"cloud.backoffInitial": c.Cloud.BackoffInitial, "cloud.backoffMax": c.Cloud.BackoffMax,
	} {
		if d < 0 {
			errs = append(errs, fmt.Errorf("%s %s is negative: use a positive duration such as \"10s\", or leave it out for the default", name, time.Duration(d)))
		}
	}
	if c.Cloud.BackoffAttempts < 0 || c.Cloud.RateLimitPerSecond < 0 {
		errs = append(errs, fmt.Errorf("cloud.backoffAttempts %d and cloud.rateLimitPerSecond %g must not be negative",
			c.Cloud.BackoffAttempts, c.Cloud.RateLimitPerSecond))
	}
	if f := loader.Forwarding(c.Forwarding); f != "" && f != loader.ForwardRedirect && f != loader.ForwardStack {
		errs = append(errs, fmt.Errorf("forwarding %q is not %q or %q: leave it out for the default (%s)",
			c.Forwarding, loader.ForwardRedirect, loader.ForwardStack, loader.ForwardRedirect))
	}
	if _, _, err := bandwidth.ParseMode(c.BandwidthMode); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, c.validateMetrics()...)
	if _, err := PprofListenAddr(c.PprofAddr); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, c.SocketLB.validate()...)
	if c.LBAlgorithm != "" {
		if _, err := service.ParseAlgorithm(c.LBAlgorithm); err != nil {
			errs = append(errs, fmt.Errorf("lbAlgorithm: %w", err))
		}
	}
	if c.MaglevTableSize != 0 {
		if err := service.ValidMaglevSize(c.MaglevTableSize); err != nil {
			errs = append(errs, fmt.Errorf("maglevTableSize: %w", err))
		}
	}
	if _, ok := c.Mode(); !ok {
		errs = append(errs, fmt.Errorf("daemonMode %q is not %q or %q (Terway's ENIOnly is not built): leave it out for %s",
			c.DaemonMode, ModeENIMultiIP, ModeVPC, ModeENIMultiIP))
	}
	if m, _ := c.Mode(); m == ModeVPC && c.PodCIDR == "" && c.Kubeconfig == "" {
		errs = append(errs, errors.New("daemonMode VPC needs the node's pod CIDR: set kubeconfig (the Node's spec.podCIDR is read) or podCIDR"))
	}
	if c.PodCIDR != "" {
		if p, err := netip.ParsePrefix(c.PodCIDR); err != nil || !p.Addr().Is4() || p.Masked() != p {
			errs = append(errs, fmt.Errorf("podCIDR %q is not a canonical IPv4 CIDR such as 10.244.1.0/24", c.PodCIDR))
		}
	}
	if c.RouteCheckInterval < 0 {
		errs = append(errs, fmt.Errorf("routeCheckInterval %s is negative", time.Duration(c.RouteCheckInterval)))
	}
	errs = append(errs, c.validateListingGrace()...)
	errs = append(errs, c.validatePolicy()...)
	errs = append(errs, c.Masquerade.validate()...)
	errs = append(errs, c.validateModes()...)
	sortErrors(errs)
	return errors.Join(errs...)
}

// sortErrors orders errors by text: map iteration would otherwise make the report vary.
func sortErrors(errs []error) {
	sort.Slice(errs, func(i, j int) bool { return errs[i].Error() < errs[j].Error() })
}
