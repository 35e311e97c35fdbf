// Package agent is tern-agent, the per-node daemon. This first cut serves IPAM to tern-cni
// over a unix socket, loads the pod datapath and attaches it to pod veths when the CNI asks,
// and garbage-collects addresses of sandboxes that are gone. It needs no Kubernetes API:
// without a kubeconfig it is IPAM-only, and the live-sandbox set comes from CNI GC and DEL.
//
// Lifecycle: New checks the config; Run loads the datapath, opens the store, starts the pool,
// serves the socket, builds and starts the registered components, and tears all of it down
// when its context ends. The agent is the composition root: components (the Kubernetes side,
// agent/kube) are registered as factories with AddComponent and built by Run from Deps, the
// parts already started, so none holds a part that is not there yet (docs/architecture.md).
package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/agent/readiness"
	"github.com/tern-net/tern/bandwidth"
	"github.com/tern-net/tern/datapath"
	"github.com/tern-net/tern/endpoint"
	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/credential"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/metadata"
	"github.com/tern-net/tern/ipam/store"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/policy/policymap"
	"github.com/tern-net/tern/service/lbmap"
)

// Component is a long-running part of the agent started after the datapath and the pool are
// up, and stopped, in reverse order, before they go down.
type Component interface {
	Name() string
	Start(ctx context.Context) error
	Stop()
}

// Agent is one node's tern-agent.
type Agent struct {
	cfg Config
	log *zap.Logger
	reg *prometheus.Registry
	m   *metrics

	mu         sync.Mutex
	components []ComponentFactory
	dp         *loader.Datapath
	endpoints  *endpoint.Registry
	pool       ipam.Allocator
	routes     aliyun.RouteCloud // the VPC route API in route mode, else nil
	sock       *sockLB           // socket-level LB; nil when off or unsupported (socklb.go)
	svcRec     *lbmap.Reconciler // the LB maps' one writer: Services and hostPorts
	attached   *sandboxTable     // attached sandboxes and their hostPorts (hostport.go)
	hostPortMu sync.Mutex        // serialises hostPort changes (table and maps in step)

	ready      atomic.Bool // the pool serves the socket; readiness says whether pods may come
	readiness  *readiness.Registry
	self       *readiness.Component // the agent's own start-up: datapath, pool, components
	attachMu   sync.Mutex           // serialises BPF attach calls
	sandboxes  sandboxLocks
	onAllocate []func(ipam.PodKey, error)
	wrappers   []AllocatorWrapper // agent/fixedip.go
	// The bandwidth manager's mode (bandwidth.go) and who hears of endpoint attach/detach.
	bwMode        bandwidth.Mode
	endpointHooks []EndpointHooks
	// policyView answers `ternctl policy get`; set by the NetworkPolicy component.
	policyView func(namespace, name string) (api.PolicyView, *api.Error)
	kinds      kindsState // optional network resource kinds (kinds.go)
}

// SetPolicyView registers what answers api.PathPolicy (the NetworkPolicy reconciler).
func (a *Agent) SetPolicyView(fn func(namespace, name string) (api.PolicyView, *api.Error)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.policyView = fn
}

// New checks cfg and builds an agent; it touches nothing.
func New(cfg Config, log *zap.Logger) (*Agent, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("agent config: %w", err)
	}
	if log == nil {
		log = zap.NewNop()
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	a := &Agent{cfg: cfg, log: log.With(zap.String("node", cfg.NodeName)), reg: reg, m: newMetrics(),
		readiness: readiness.New()}
	self, err := a.readiness.Register("agent", "not started")
	if err != nil {
		return nil, err
	}
	a.self = self
	reg.MustRegister(a.m.collectors()...)
	return a, nil
}

// Readiness is the registry of everything that must be in place before the node takes pods.
// A datapath component registers itself in its Start and reports ready after its first full
// sync; Run installs the CNI configuration, and /readyz and CNI STATUS answer ready, only
// once every registered component is ready.
func (a *Agent) Readiness() *readiness.Registry { return a.readiness }

// AddComponent registers a component, built by Run from the started parts (Deps) and
// started after them; call it before Run.
func (a *Agent) AddComponent(build ComponentFactory) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.components = append(a.components, build)
}

// OnAllocate registers fn to hear the outcome of every allocation the CNI asks for (err nil
// on success), e.g. to report exhaustion as a Kubernetes Event. fn runs on the request's
// goroutine and must not block.
func (a *Agent) OnAllocate(fn func(ipam.PodKey, error)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.onAllocate = append(a.onAllocate, fn)
}

func (a *Agent) notifyAllocate(key ipam.PodKey, err error) {
	a.mu.Lock()
	hooks := append([]func(ipam.PodKey, error){}, a.onAllocate...)
	a.mu.Unlock()
	for _, fn := range hooks {
		fn(key, err)
	}
}

// loadedDatapath is the loaded datapath, nil until Run has loaded it (components get it in Deps).
func (a *Agent) loadedDatapath() *loader.Datapath {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.dp
}

// startedPool is the address source (the ENIIP pool, or the route mode's pod CIDR), nil until
// Run has started it (components get it in Deps).
func (a *Agent) startedPool() ipam.Allocator {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.pool
}

// Registry is the agent's Prometheus registry; components register their metrics here.
func (a *Agent) Registry() *prometheus.Registry { return a.reg }

// Config returns the configuration with defaults applied.
func (a *Agent) Config() Config { return a.cfg }

// Run runs the agent until ctx ends. The socket is served from the start, answering "try
// again later" until the pool is up, so a CNI call during start-up fails fast and retries.
func (a *Agent) Run(ctx context.Context) error {
	// Who this node is comes first: everything the socket answers is about this instance.
	// Without tern's IPAM the node need not be an ECS instance at all.
	if a.cfg.InstanceID == "" && !a.cfg.IPAM.Off() {
		a.log.Info("instanceID is not configured: reading it from the instance metadata service (up to 30s)",
			zap.String("endpoint", a.cfg.MetadataEndpoint))
		id, err := metadata.New(a.cfg.MetadataEndpoint).Get(ctx, "instance-id", 30*time.Second)
		if err != nil {
			return err
		}
		a.cfg.InstanceID = id
		a.log.Info("instance ID from the metadata service", zap.String("instance", id))
	}
	var cleanups []func()
	defer func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
	}()

	srv, removeSocket, err := a.serveSocket()
	if err != nil {
		return err
	}
	cleanups = append(cleanups, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		removeSocket()
	})
	if a.cfg.MetricsAddr != "" {
		msrv, err := a.serveMetrics()
		if err != nil {
			return err
		}
		cleanups = append(cleanups, func() { _ = msrv.Close() })
	}
	if a.cfg.PprofAddr != "" {
		psrv, err := a.servePprof()
		if err != nil {
			return err
		}
		cleanups = append(cleanups, func() { _ = psrv.Close() })
	}

	a.self.NotReady("loading the datapath")
	if err := datapath.PrepareNode(); err != nil {
		return fmt.Errorf("prepare node sysctls: %w", err)
	}
	bwMode, err := a.chooseBandwidthMode()
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.bwMode = bwMode
	a.mu.Unlock()
	bwModeMetric := bandwidth.ModeCollector(bwMode)
	a.reg.MustRegister(bwModeMetric)
	cleanups = append(cleanups, func() { a.reg.Unregister(bwModeMetric) })
	lcfg := loader.Config{PinRoot: a.cfg.PinRoot, ForceClsact: a.cfg.ForceClsact,
		Forwarding:  loader.Forwarding(a.cfg.Forwarding),
		MaxServices: a.cfg.MaxServices, MaxBackends: a.cfg.MaxBackends, MaxFlows: a.cfg.MaxFlows,
		MaxAffinity: a.cfg.MaxAffinity, MaxMaglevBlocks: a.cfg.MaxMaglevBlocks, MaxPolicyCIDRs: a.cfg.MaxPolicyCIDRs,
		BandwidthEDT: bwMode == bandwidth.ModeEDT, PolicyAllowedEvents: a.cfg.NetworkPolicy.AllowedEvents,
		Logger: a.log.Named("loader")}
	if err := a.masqueradeLoadConfig(&lcfg); err != nil {
		return err
	}
	a.nodePortLoadConfig(&lcfg)
	if err := a.snatPortsLoadConfig(&lcfg); err != nil {
		return err
	}
	dp, err := loader.Load(lcfg)
	if err != nil {
		return fmt.Errorf("load datapath: %w", err)
	}
	endpoints, err := openEndpoints(dp, a.log.Named("endpoint"))
	if err != nil {
		_ = dp.Close()
		return fmt.Errorf("load endpoint registry: %w", err)
	}
	a.mu.Lock()
	a.dp = dp
	a.endpoints = endpoints
	a.mu.Unlock()
	cleanups = append(cleanups, func() { _ = dp.Close() })
	stopSock, err := a.startSockLB(ctx, dp)
	if err != nil {
		return err
	}
	cleanups = append(cleanups, stopSock)
	dpMetrics := loader.NewCollector(dp.Maps())
	a.reg.MustRegister(dpMetrics)
	cleanups = append(cleanups, func() { a.reg.Unregister(dpMetrics) })
	polMetrics := policymap.NewCollector(dp.PolicyMaps())
	a.reg.MustRegister(polMetrics)
	cleanups = append(cleanups, func() { a.reg.Unregister(polMetrics) })

	if err := a.startServiceMaps(dp); err != nil {
		return err
	}
	if a.cfg.IPAM.Off() {
		// Chaining: no eni_conf, no cloud, no store, no pool. The node's NIC still gets the
		// netdev programs.
		a.log.Info("IPAM is off (ipam.mode none): tern-cni runs chained after another plugin; no cloud credentials are read and no ENI is touched")
		if err := a.syncNonMasquerade(ctx, dp, eniconfig.Config{}); err != nil {
			return err
		}
		if a.cfg.Masquerade.Enabled {
			gctx, gcancel := context.WithCancel(ctx)
			gdone := make(chan struct{})
			go func() { defer close(gdone); a.runSNATGC(gctx, dp) }()
			cleanups = append(cleanups, func() { gcancel(); <-gdone })
		}
		a.attachNetdevs(dp, nil)
	} else {
		stop, err := a.startIPAM(ctx, dp)
		cleanups = append(cleanups, stop)
		if err != nil {
			return err
		}
	}

	a.self.NotReady("starting components")
	a.mu.Lock()
	builds := append([]ComponentFactory(nil), a.components...)
	a.mu.Unlock()
	deps := a.deps()
	for _, build := range builds {
		c, err := build(deps)
		if err != nil {
			return fmt.Errorf("build component: %w", err)
		}
		if err := c.Start(ctx); err != nil {
			return fmt.Errorf("start component %s: %w", c.Name(), err)
		}
		cleanups = append(cleanups, c.Stop)
	}
	// The pool serves from here on: a restarted agent's node already has the CNI
	// configuration and its pinned maps still hold the last agent's Services.
	a.ready.Store(true)
	a.self.Ready()
	cleanups = append(cleanups, func() {
		a.ready.Store(false)
		a.self.NotReady("stopping")
	})
	if err := a.waitReadyForPods(ctx); err != nil {
		return err
	}
	// Pods running under an older agent's programs move to this one's once the maps hold
	// every Service (an upgrade converts the old layout's flows first).
	a.takeOverPods(dp)
	if pool := a.startedPool(); pool != nil {
		s := pool.Status()
		a.log.Info("agent ready", zap.String("socket", a.cfg.SocketPath), zap.String("instance", a.cfg.InstanceID),
			zap.Int("idle", s.Idle), zap.Int("inUse", s.InUse), zap.Int("enis", len(s.ENIs)))
	} else {
		a.log.Info("agent ready (chaining: Services, hostPorts and policy only)", zap.String("socket", a.cfg.SocketPath))
	}
	<-ctx.Done()
	a.log.Info("agent stopping")
	return nil
}

// startPool starts the pool, retrying with backoff: the cloud may be throttling or briefly
// unavailable, and a node agent that gives up leaves the node without pod networking.
func (a *Agent) startPool(ctx context.Context, pool ipam.Allocator) error {
	delay := 200 * time.Millisecond
	for attempt := 1; ; attempt++ {
		sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		err := pool.Start(sctx)
		cancel()
		if err == nil {
			return nil
		}
		if errors.Is(err, aliyun.ErrCredentials) || errors.Is(err, aliyun.ErrForbidden) {
			return fmt.Errorf("start IPAM pool: %w", err)
		}
		a.log.Warn("IPAM pool start failed; retrying", zap.Int("attempt", attempt), zap.Duration("in", delay), zap.Error(err))
		select {
		case <-ctx.Done():
			return fmt.Errorf("start IPAM pool: %w (last error: %v)", ctx.Err(), err)
		case <-time.After(delay):
		}
		delay = min(2*delay, 10*time.Second)
	}
}

func (a *Agent) newCloud(eniCfg eniconfig.Config) (*aliyun.Client, error) {
	cred, err := credential.Resolve(eniCfg.AccessKey, eniCfg.AccessSecret, eniCfg.CredentialPath, os.Getenv)
	if err != nil {
		return nil, fmt.Errorf("cloud credentials (set access_key/access_secret or credential_path in eni_conf, or %s/%s): %w",
			credential.EnvAccessKeyID, credential.EnvAccessKeySecret, err)
	}
	region := a.cfg.RegionID
	if region == "" {
		region = eniCfg.RegionID
	}
	if region == "" {
		r, err := metadata.New(a.cfg.MetadataEndpoint).Get(context.Background(), "region-id", 30*time.Second)
		if err != nil {
			return nil, fmt.Errorf("no region_id in eni_conf or the agent config, and %w", err)
		}
		region = r
	}
	var src credential.Source = credential.Static(cred)
	if cred.Source == "file:"+eniCfg.CredentialPath {
		// Terway's token file is rotated by the platform (a new STS key before the old one
		// expires): every call re-checks it, so rotation needs no restart.
		fs, err := credential.NewFileSource(eniCfg.CredentialPath, nil)
		if err != nil {
			return nil, err
		}
		src = fs
	}
	t := a.cfg.Cloud
	opts := aliyun.Options{
		RegionID: region, Credentials: src, Endpoint: a.cfg.CloudEndpoint,
		CallTimeout: time.Duration(t.CallTimeout), PollInterval: time.Duration(t.PollInterval), WaitTimeout: time.Duration(t.WaitTimeout),
		Logger: a.log.Named("cloud"),
	}
	if t.BackoffAttempts > 0 {
		opts.Backoff = aliyun.Backoff{Initial: time.Duration(t.BackoffInitial), Max: time.Duration(t.BackoffMax),
			Multiplier: 2, Jitter: 0.5, MaxAttempts: t.BackoffAttempts}
		if opts.Backoff.Initial <= 0 {
			opts.Backoff.Initial = 100 * time.Millisecond
		}
		if opts.Backoff.Max <= 0 {
			opts.Backoff.Max = 3 * time.Second
		}
	}
	if t.RateLimitPerSecond > 0 {
		opts.RateLimits = map[string]aliyun.RateLimit{}
		for k := range aliyun.DefaultRateLimits() {
			opts.RateLimits[k] = aliyun.RateLimit{PerSecond: t.RateLimitPerSecond, Burst: int(2 * t.RateLimitPerSecond)}
		}
	}
	c, err := aliyun.New(opts)
	if err != nil {
		return nil, err
	}
	a.reg.MustRegister(c.Collectors()...)
	return c, nil
}

// installConflist writes the CNI configuration into CNIConfDir atomically (a runtime that
// reads the directory never sees half a file). It is left in place on shutdown: pods keep
// their networking, and the next agent rewrites it.
func (a *Agent) installConflist() (string, error) {
	b, err := api.Conflist(a.cfg.SocketPath)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(a.cfg.CNIConfDir, 0o755); err != nil {
		return "", fmt.Errorf("create CNI config directory %s: %w", a.cfg.CNIConfDir, err)
	}
	path := filepath.Join(a.cfg.CNIConfDir, api.ConflistFile)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return "", fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", fmt.Errorf("install %s: %w", path, err)
	}
	return path, nil
}

// startIPAM starts tern's ENIIP side: the eni_conf watcher, the cloud client, the store and
// the pool, and attaches the netdev programs to the ENIs. stop undoes what was started, also
// when err is not nil.
func (a *Agent) startIPAM(ctx context.Context, dp *loader.Datapath) (stop func(), err error) {
	var stops []func()
	stop = func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}
	// The watcher hands reloads to the pool once it runs; it only runs after the pool started.
	watcher := eniconfig.NewWatcher(a.cfg.ENIConfigPath, time.Duration(a.cfg.ENIConfigPollInterval), a.log.Named("eniconfig"),
		func(c eniconfig.Config) {
			if p := a.startedPool(); p != nil {
				p.UpdateConfig(c)
			}
			// service_cidr is part of the non-masquerade set.
			if err := a.syncNonMasquerade(ctx, dp, c); err != nil {
				a.log.Error("could not update the non-masquerade destinations after an eni_conf change", zap.Error(err))
			}
		})
	eniCfg, err := watcher.Load()
	if err != nil {
		return stop, fmt.Errorf("load eni_conf (fix the file and restart): %w", err)
	}
	// Before any pod is attached: an empty set with masquerade on would translate pod
	// traffic inside the VPC.
	if err := a.syncNonMasquerade(ctx, dp, eniCfg); err != nil {
		return stop, err
	}
	if a.cfg.Masquerade.Enabled {
		gctx, gcancel := context.WithCancel(ctx)
		gdone := make(chan struct{})
		go func() { defer close(gdone); a.runSNATGC(gctx, dp) }()
		stops = append(stops, func() { gcancel(); <-gdone })
	}
	a.reg.MustRegister(watcher.Collectors()...)

	a.self.NotReady("starting the IP pool (cloud API)")
	cloud, err := a.newCloud(eniCfg)
	if err != nil {
		return stop, err
	}
	stops = append(stops, cloud.Close)

	if err := os.MkdirAll(filepath.Dir(a.cfg.StatePath), 0o700); err != nil {
		return stop, fmt.Errorf("create state directory for %s: %w", a.cfg.StatePath, err)
	}
	st, err := store.Open(a.cfg.StatePath, 10*time.Second)
	if err != nil {
		return stop, fmt.Errorf("open IPAM store %s (is another agent running?): %w", a.cfg.StatePath, err)
	}
	stops = append(stops, func() { _ = st.Close() })

	pool, err := a.newAllocator(ctx, cloud, st, eniCfg)
	if err != nil {
		return stop, err
	}
	a.reg.MustRegister(pool.Collectors()...)
	if err := a.startPool(ctx, pool); err != nil {
		return stop, err
	}
	stops = append(stops, pool.Stop)
	a.mu.Lock()
	a.pool = pool
	a.mu.Unlock()
	a.attachNetdevs(dp, pool)

	wctx, wcancel := context.WithCancel(ctx)
	wdone := make(chan struct{})
	go func() { defer close(wdone); watcher.Run(wctx) }()
	stops = append(stops, func() { wcancel(); <-wdone })

	return stop, nil
}
