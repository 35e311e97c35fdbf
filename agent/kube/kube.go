// Package kube is the Kubernetes-driven part of tern-agent, one file per job: the service
// load-balancer controller and healthCheckNodePort servers (services.go; nodewatch.go keeps
// its node addresses and zone current), the Node's IPAM
// report and the Events on pods whose address could not be allocated (nodereport.go), garbage
// collection of addresses whose pods are gone (podgc.go), the pods' bandwidth annotations
// (bandwidth.go), NetworkPolicy (policy.go) and the VPC route mode's janitor (routes.go).
// kube.go starts and stops them as one agent component when the agent has a kubeconfig;
// without one the agent is IPAM-only.
package kube

import (
	"context"
	"errors"
	"sync"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/ipam"
)

// Options tune the component.
type Options struct {
	ServiceResync  time.Duration
	GCInterval     time.Duration // pod GC; default 1 minute
	ReportInterval time.Duration // Node report; default 30 s
	// Fixed, when set, turns on fixed IPs for StatefulSets (FixedIP records; fixedip.go). Its
	// Wrap must be registered with agent.WrapAllocator before the agent runs.
	Fixed *FixedIPs
}

// Component implements agent.Component.
type Component struct {
	deps   agent.Deps
	client kubernetes.Interface
	opts   Options
	log    *zap.Logger

	recorder    record.EventRecorder
	broadcaster record.EventBroadcaster
	pods        cache.SharedIndexInformer // this node's pods: GC and bandwidth
	// The jobs with a life of their own (services.go, nodereport.go); report is nil
	// without a pool.
	services *serviceLB
	report   *nodeReport
	fixed    *FixedIPs // nil without Options.Fixed

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// New builds the component from the agent's started parts; Start runs it.
func New(deps agent.Deps, client kubernetes.Interface, opts Options, log *zap.Logger) (*Component, error) {
	if deps.Datapath == nil || deps.Services == nil || deps.Endpoints == nil {
		return nil, errors.New("kubernetes component: the agent's datapath, LB reconciler and endpoint registry are needed (build it from agent.Deps in Run)")
	}
	if opts.GCInterval == 0 {
		opts.GCInterval = time.Minute
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &Component{deps: deps, client: client, opts: opts, fixed: opts.Fixed, log: log.Named("kube")}, nil
}

func (c *Component) Name() string { return "kubernetes" }

// Start begins watching; it returns once everything is started, not synced. The "services"
// readiness component it registers becomes ready after the first full Service sync.
func (c *Component) Start(ctx context.Context) error {
	ctx, c.cancel = context.WithCancel(ctx)
	node := c.deps.Config.NodeName

	c.broadcaster = record.NewBroadcaster(record.WithContext(ctx))
	c.broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: c.client.CoreV1().Events("")})
	c.recorder = c.broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "tern-agent", Host: node})

	c.services = &serviceLB{deps: c.deps, client: c.client, recorder: c.recorder, resync: c.opts.ServiceResync, log: c.log}
	if err := c.services.Start(ctx, node); err != nil {
		return err
	}

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
	c.startFixedIP(ctx)
	if err := c.startPolicy(ctx); err != nil {
		return err
	}

	if c.deps.Pool != nil {
		c.report = &nodeReport{deps: c.deps, client: c.client, recorder: c.recorder, interval: c.opts.ReportInterval, log: c.log}
		c.report.Start(ctx, node)
		c.wg.Add(1)
		go func() { defer c.wg.Done(); c.gcLoop(ctx) }()
	}
	if rp, ok := c.deps.Pool.(*ipam.RoutePool); ok && c.deps.RouteCloud != nil {
		c.startRouteJanitor(ctx, rp)
	}
	return nil
}

// Stop ends everything the component started. The maps stay as they are.
func (c *Component) Stop() {
	if c.cancel != nil {
		c.cancel()
	}
	c.wg.Wait()
	if c.report != nil {
		c.report.Stop()
	}
	if c.services != nil {
		c.services.Stop()
	}
	if c.broadcaster != nil {
		c.broadcaster.Shutdown()
	}
}
