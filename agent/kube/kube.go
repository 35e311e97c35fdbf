// Package kube is the Kubernetes-driven part of tern-agent: the service load-balancer
// controller, the Node's IPAM report, Events on pods whose address could not be
// allocated, garbage collection of addresses whose pods are gone, and the pods' bandwidth
// annotations (bandwidth.go). The agent runs it as
// one component when it has a kubeconfig; without one the agent is IPAM-only.
package kube

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/nodereport"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/controller"
	"github.com/tern-net/tern/service/healthcheck"
	"github.com/tern-net/tern/service/lbmap"
)

// Options tune the component.
type Options struct {
	ServiceResync  time.Duration
	GCInterval     time.Duration // pod GC; default 1 minute
	ReportInterval time.Duration // Node report; default 30 s
}

// Component implements agent.Component.
type Component struct {
	a      *agent.Agent
	client kubernetes.Interface
	opts   Options
	log    *zap.Logger

	recorder    record.EventRecorder
	broadcaster record.EventBroadcaster
	reporter    *nodereport.Reporter
	ctl         *controller.Controller
	health      *healthcheck.Server
	pods        cache.SharedIndexInformer

	mu        sync.Mutex
	exhausted string // why the last allocation failed for lack of addresses; "" when fine

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// New builds the component; Start runs it.
func New(a *agent.Agent, client kubernetes.Interface, opts Options, log *zap.Logger) *Component {
	if opts.GCInterval == 0 {
		opts.GCInterval = time.Minute
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &Component{a: a, client: client, opts: opts, log: log.Named("kube")}
}

func (c *Component) Name() string { return "kubernetes" }

// Start begins watching; it returns once everything is started, not synced. The "services"
// readiness component it registers becomes ready after the first full Service sync.
func (c *Component) Start(ctx context.Context) error {
	ctx, c.cancel = context.WithCancel(ctx)
	node := c.a.Config().NodeName

	c.broadcaster = record.NewBroadcaster(record.WithContext(ctx))
	c.broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: c.client.CoreV1().Events("")})
	c.recorder = c.broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "tern-agent", Host: node})

	dp := c.a.Datapath()
	if dp == nil {
		return errors.New("kubernetes component: the datapath is not loaded")
	}
	// The agent's reconciler: it also holds the hostPorts, which Service syncs must keep.
	rec := c.a.ServiceReconciler()
	if rec == nil {
		var err error
		if rec, err = lbmap.NewReconciler(c.a.LBMaps(dp), c.log); err != nil {
			return fmt.Errorf("service reconciler: %w", err)
		}
	}
	// The node is not ready for pods until every Service of the initial list is in the maps:
	// a pod's first packets (DNS, usually) go to ClusterIPs.
	svcReady, err := c.a.Readiness().Register("services", controller.FirstSync{}.String())
	if err != nil {
		return err
	}
	tr := c.translator(ctx, node)
	// healthCheckNodePort servers, on the addresses NodePorts are served on; the proxy is
	// healthy once the first full sync is in the maps.
	c.health = healthcheck.New(tr.Node.Addrs, func() bool { return c.ctl != nil && c.ctl.HasSynced() }, c.log.Named("healthcheck"))
	c.ctl, err = controller.New(c.client, rec, controller.Options{ResyncInterval: c.opts.ServiceResync,
		Translator: tr,
		OnService:  c.serviceHealth,
		Recorder:   c.recorder, Registerer: c.a.Registry(), Logger: c.log,
		Progress: func(p controller.FirstSync) {
			if p.Done {
				svcReady.Ready()
			} else {
				svcReady.NotReady(p.String())
			}
		}})
	if err != nil {
		return err
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		if err := c.ctl.Run(ctx); err != nil {
			c.log.Error("service controller stopped", zap.Error(err))
		}
	}()

	// The node's pods: for address GC and for the bandwidth annotations.
	factory := informers.NewSharedInformerFactoryWithOptions(c.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
		}))
	c.pods = factory.Core().V1().Pods().Informer()
	if err := c.startBandwidth(ctx); err != nil {
		return err
	}
	c.wg.Add(1)
	go func() { defer c.wg.Done(); c.pods.Run(ctx.Done()) }()
	if err := c.startPolicy(ctx); err != nil {
		return err
	}

	if c.a.Pool() != nil {
		c.reporter = nodereport.New(c.client, node, c.snapshot, c.opts.ReportInterval, c.log)
		c.a.OnAllocate(c.allocated)
		c.wg.Add(1)
		go func() { defer c.wg.Done(); c.reporter.Run(ctx) }()
		c.wg.Add(1)
		go func() { defer c.wg.Done(); c.gcLoop(ctx) }()
	}
	if rp, ok := c.a.Pool().(*ipam.RoutePool); ok && c.a.RouteCloud() != nil {
		c.startRouteJanitor(ctx, rp)
	}
	return nil
}

// translator says what service translation needs of this node: its name, its zone (read
// once from the Node's topology.kubernetes.io/zone label, as kube-proxy reads it at start;
// without it topology hints are ignored, as kube-proxy ignores them) and the configured
// algorithm defaults (validated with the config).
func (c *Component) translator(ctx context.Context, node string) service.Translator {
	cfg := c.a.Config()
	tr := service.Translator{Node: service.Node{Name: node, Addrs: c.a.NodeAddrs()}, MaglevTableSize: cfg.MaglevTableSize}
	if cfg.LBAlgorithm != "" {
		tr.DefaultAlgorithm, _ = service.ParseAlgorithm(cfg.LBAlgorithm)
	}
	n, err := c.client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		c.log.Warn("cannot read this node's zone: topology hints are ignored until the agent restarts",
			zap.String("node", node), zap.Error(err))
		return tr
	}
	tr.Node.Zone = n.Labels[corev1.LabelTopologyZone]
	return tr
}

// serviceHealth keeps a Service's healthCheckNodePort server (if it needs one) in step
// with its local ready endpoints. A port that cannot be opened becomes a Warning Event, as
// kube-proxy's FailedToStartServiceHealthcheck.
func (c *Component) serviceHealth(nn types.NamespacedName, svc *corev1.Service, eps []*discoveryv1.EndpointSlice) {
	port := healthcheck.Port(svc)
	if err := c.health.Update(nn, port, healthcheck.LocalReadyEndpoints(c.a.Config().NodeName, eps)); err != nil {
		c.log.Error("health check node port not served", zap.String("service", nn.String()), zap.Error(err))
		if svc != nil {
			c.recorder.Eventf(svc, corev1.EventTypeWarning, "FailedToStartServiceHealthcheck", "%v", err)
		}
	}
}

// Stop ends everything the component started. The maps stay as they are.
func (c *Component) Stop() {
	if c.cancel != nil {
		c.cancel()
	}
	c.wg.Wait()
	if c.health != nil {
		c.health.Close()
	}
	if c.broadcaster != nil {
		c.broadcaster.Shutdown()
	}
}

func (c *Component) snapshot() nodereport.Snapshot {
	pool := c.a.Pool()
	st := pool.Status()
	c.mu.Lock()
	why := c.exhausted
	c.mu.Unlock()
	return nodereport.Snapshot{ENIIPs: st.InUseByENI(), MaxPods: st.Capacity.MaxPods, InUse: st.InUse,
		Exhausted: why != "", Reason: why, ExtendedResources: nodereport.ExtendedResourcesOf(st.Kinds)}
}

// allocated hears every allocation the CNI asked for. A failure becomes a Warning Event on
// the pod with the cloud's error code, where `kubectl describe pod` shows it.
func (c *Component) allocated(key ipam.PodKey, err error) {
	if err == nil {
		c.mu.Lock()
		c.exhausted = ""
		c.mu.Unlock()
		c.reporter.Changed()
		return
	}
	reason, code := "TernIPAllocationFailed", ""
	var apiErr *aliyun.APIError
	if errors.As(err, &apiErr) {
		code = apiErr.Code
	}
	if errors.Is(err, ipam.ErrVSwitchExhausted) || errors.Is(err, ipam.ErrNodeFull) {
		reason = "TernPodIPsExhausted"
		c.mu.Lock()
		c.exhausted = err.Error()
		c.mu.Unlock()
		c.reporter.Changed()
	}
	msg := err.Error()
	if code != "" {
		msg = fmt.Sprintf("cloud error %s: %v", code, err)
	}
	ref := &corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: key.Namespace, Name: key.Name}
	c.recorder.Event(ref, corev1.EventTypeWarning, reason, boundEventMessage(msg))
}

// gcLoop releases addresses of pods that no longer exist on this node. A pod must be missing
// from the synced cache on two passes in a row: the kubelet creates the Pod object before it
// calls the CNI, so a pod the cache lacks once may only be new.
func (c *Component) gcLoop(ctx context.Context) {
	if !cache.WaitForCacheSync(ctx.Done(), c.pods.HasSynced) {
		return
	}
	missing := map[ipam.PodKey]int{}
	t := time.NewTicker(c.opts.GCInterval)
	defer t.Stop()
	for {
		live := map[string]bool{}
		for _, o := range c.pods.GetStore().List() {
			p := o.(*corev1.Pod)
			if p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
				live[p.Namespace+"/"+p.Name] = true
			}
		}
		next := map[ipam.PodKey]int{}
		res, err := c.a.GC(ctx, func(k ipam.PodKey) bool {
			if live[k.Namespace+"/"+k.Name] {
				return true
			}
			next[k] = missing[k] + 1
			return next[k] < 2
		})
		missing = next
		if err != nil {
			c.log.Warn("pod address GC incomplete", zap.Error(err))
		} else if len(res.Released) > 0 {
			c.log.Info("released addresses of deleted pods", zap.Int("count", len(res.Released)))
			c.reporter.Changed()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
