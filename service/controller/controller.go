// Package controller feeds the service load balancer from Kubernetes: informers on Services
// and EndpointSlices, a rate-limited workqueue keyed by Service, the desired-state builder
// and the LB map reconciler, with a periodic full resync that repairs drift.
package controller

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	coreinformers "k8s.io/client-go/informers/core/v1"
	discoveryinformers "k8s.io/client-go/informers/discovery/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"

	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/lbmap"
)

const byServiceIndex = "tern-service"

// Options tune the controller. Zero values take the defaults.
type Options struct {
	// ResyncInterval is how often the whole desired state is compared with the maps.
	ResyncInterval time.Duration
	// GCInterval is how often retired reverse-NAT entries are collected.
	GCInterval time.Duration
	Recorder   record.EventRecorder // optional: Events on Services that cannot be served
	Registerer prometheus.Registerer
	Logger     *zap.Logger
	// Progress, when set, hears how far the first full sync has come, on every change that
	// matters to an operator, last with Done. The agent's readiness follows it. It is called
	// from the controller's goroutines, one call at a time, and must not block.
	Progress func(FirstSync)
	// Translator is what translation needs to know of this node (its name and zone, for
	// internalTrafficPolicy Local and topology hints) and its defaults (load-balancing
	// algorithm, Maglev table size). The zero value knows no node: no endpoint is local.
	Translator service.Translator
	// OnService, when set, hears every Service the controller translated, with its
	// EndpointSlices (svc nil: the Service is gone). The agent's healthCheckNodePort servers
	// follow it. Called from the controller's goroutine; must not block.
	OnService func(nn types.NamespacedName, svc *service.Service, eps []*service.Slice)
}

// Controller keeps the LB maps equal to what the cluster's Services and EndpointSlices ask.
type Controller struct {
	client  kubernetes.Interface
	rec     *lbmap.Reconciler
	builder *service.Builder
	opts    Options
	log     *zap.Logger
	queue   workqueue.TypedRateLimitingInterface[types.NamespacedName]

	svcInformer   cache.SharedIndexInformer
	sliceInformer cache.SharedIndexInformer

	// waitingForRoom holds the Services whose last write failed because an LB map was full.
	// The queue's backoff for them grows to minutes while the map stays full; a sync that
	// succeeds may have freed room, so it requeues them at once. Only the worker touches it.
	waitingForRoom map[types.NamespacedName]bool
	// unwritten holds, per Service, the frontends whose last write to the maps failed. The
	// builder already counts them as desired, so a retry's Set finds nothing changed: without
	// this the retry wrote nothing, "succeeded", and the frontend waited for the periodic
	// full resync. Only the worker touches it.
	unwritten map[types.NamespacedName][]service.Frontend

	// node is a node description SetNode handed over for the worker to apply (nil: none).
	nodeMu sync.Mutex
	node   *service.Node

	synced     atomic.Bool // the first full sync is in the maps
	progressMu sync.Mutex
	progress   FirstSync

	m metrics
}

type metrics struct {
	syncs       *prometheus.CounterVec
	syncSeconds *prometheus.HistogramVec
	invalid     prometheus.Counter
	frontends   prometheus.Gauge
	mapWrites   prometheus.CounterFunc
}

// New builds a controller over a client and a reconciler. Nothing runs until Run.
func New(client kubernetes.Interface, rec *lbmap.Reconciler, opts Options) (*Controller, error) {
	if opts.ResyncInterval == 0 {
		opts.ResyncInterval = 5 * time.Minute
	}
	if opts.GCInterval == 0 {
		opts.GCInterval = 30 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	c := &Controller{
		client:         client,
		rec:            rec,
		builder:        service.NewBuilderFor(opts.Translator),
		opts:           opts,
		log:            opts.Logger.Named("services"),
		waitingForRoom: map[types.NamespacedName]bool{},
		unwritten:      map[types.NamespacedName][]service.Frontend{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.DefaultTypedControllerRateLimiter[types.NamespacedName](),
			workqueue.TypedRateLimitingQueueConfig[types.NamespacedName]{Name: "services"}),
	}
	c.m = metrics{
		syncs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tern_service_syncs_total",
			Help: "Service reconciliations by kind (service, full) and result."}, []string{"kind", "result"}),
		syncSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "tern_service_sync_duration_seconds",
			Help:    "Time to reconcile one Service (kind=service) or everything (kind=full) into the maps.",
			Buckets: prometheus.ExponentialBuckets(0.00005, 4, 10)}, []string{"kind"}),
		invalid: prometheus.NewCounter(prometheus.CounterOpts{Name: "tern_service_invalid_total",
			Help: "Services with fields tern could not translate (each occurrence; see Events)."}),
		frontends: prometheus.NewGauge(prometheus.GaugeOpts{Name: "tern_service_frontends",
			Help: "Frontends (cluster IP, port, protocol) in the desired state."}),
		mapWrites: prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "tern_service_map_writes_total",
			Help: "Writes and deletes to the LB maps."}, func() float64 { return float64(rec.Writes()) }),
	}
	if opts.Registerer != nil {
		for _, col := range []prometheus.Collector{c.m.syncs, c.m.syncSeconds, c.m.invalid, c.m.frontends, c.m.mapWrites} {
			if err := opts.Registerer.Register(col); err != nil {
				return nil, fmt.Errorf("register service metrics: %w", err)
			}
		}
	}

	// Informers of our own rather than a factory's: a factory's come with a namespace index
	// (a set of every key per namespace) that nothing here reads. Slices are indexed by
	// their Service only.
	c.svcInformer = coreinformers.NewServiceInformer(client, metav1.NamespaceAll, 0, cache.Indexers{})
	c.sliceInformer = discoveryinformers.NewEndpointSliceInformer(client, metav1.NamespaceAll, 0,
		cache.Indexers{byServiceIndex: sliceServiceKey})
	enqueue := func(obj any) {
		if nn, ok := serviceKeyOf(obj); ok {
			c.queue.Add(nn)
		}
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, obj any) { enqueue(obj) },
		DeleteFunc: enqueue,
	}
	if _, err := c.svcInformer.AddEventHandler(handler); err != nil {
		return nil, err
	}
	if _, err := c.sliceInformer.AddEventHandler(handler); err != nil {
		return nil, err
	}
	compact := newCompacter()
	for _, inf := range []cache.SharedIndexInformer{c.svcInformer, c.sliceInformer} {
		if err := inf.SetWatchErrorHandlerWithContext(c.watchError); err != nil {
			return nil, fmt.Errorf("set the informers' watch error handler: %w", err)
		}
		if err := inf.SetTransform(compact.transform); err != nil {
			return nil, fmt.Errorf("set the informers' transform: %w", err)
		}
	}
	return c, nil
}

func sliceServiceKey(obj any) ([]string, error) {
	s, ok := obj.(*service.Slice)
	if !ok {
		return nil, nil
	}
	nn, ok := s.Key()
	if !ok {
		return nil, nil
	}
	return []string{nn.String()}, nil
}

// serviceKeyOf names the Service an event is about (itself, or the owner of a slice).
func serviceKeyOf(obj any) (types.NamespacedName, bool) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	switch o := obj.(type) {
	case *service.Service:
		return o.Key(), true
	case *service.Slice:
		return o.Key()
	}
	return types.NamespacedName{}, false
}

// Run starts the informers, does a full sync once their caches are filled, then follows
// changes until ctx ends. The maps are left as they are on return: the datapath keeps
// serving while the agent is away.
func (c *Controller) Run(ctx context.Context) error {
	go func() {
		<-ctx.Done()
		c.queue.ShutDown()
	}()
	go c.svcInformer.Run(ctx.Done())
	go c.sliceInformer.Run(ctx.Done())
	if err := c.waitForInformers(ctx); err != nil {
		return err
	}
	if err := c.fullSync(); err != nil {
		// Keep serving what was written; the full sync is retried with backoff until it
		// succeeds, and only then is the first sync done (HasSynced, Progress).
		c.log.Error("initial full sync incomplete; retrying", zap.Error(err))
		c.queue.AddRateLimited(fullSyncKey)
	}
	go c.periodic(ctx)
	for c.processNext() {
	}
	return nil
}

// HasSynced tells whether the first full sync is done: the informers have listed every
// Service and EndpointSlice, and every frontend they yield has been written to the maps
// without error. The node is not ready for pods before.
func (c *Controller) HasSynced() bool { return c.synced.Load() }

func (c *Controller) periodic(ctx context.Context) {
	resync := time.NewTicker(c.opts.ResyncInterval)
	gc := time.NewTicker(c.opts.GCInterval)
	defer resync.Stop()
	defer gc.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-resync.C:
			// Queued through the same worker so the builder is only touched by one goroutine.
			c.queue.Add(fullSyncKey)
		}
	}
}

// fullSyncKey is a queue key no Service can have (names cannot contain '/').
var fullSyncKey = types.NamespacedName{Namespace: "/", Name: "full-sync"}

func (c *Controller) processNext() bool {
	nn, quit := c.queue.Get()
	if quit {
		return false
	}
	defer c.queue.Done(nn)
	var err error
	if nn == fullSyncKey {
		c.applyNode()
		err = c.fullSync()
	} else {
		err = c.syncService(nn)
	}
	if err != nil {
		c.log.Warn("service sync failed; retrying with backoff", zap.Stringer("service", nn), zap.Error(err))
		if errors.Is(err, unix.E2BIG) { // the kernel's answer to an update of a full map
			c.waitingForRoom[nn] = true
		}
		c.queue.AddRateLimited(nn)
		return true
	}
	c.queue.Forget(nn)
	delete(c.waitingForRoom, nn)
	for w := range c.waitingForRoom {
		c.queue.Add(w)
	}
	return true
}

func (c *Controller) lookup(nn types.NamespacedName) (*service.Service, []*service.Slice, error) {
	var svc *service.Service
	obj, exists, err := c.svcInformer.GetStore().GetByKey(nn.String())
	if err != nil {
		return nil, nil, err
	}
	if exists {
		svc = obj.(*service.Service)
	}
	eps, err := c.slicesOf(nn)
	return svc, eps, err
}

// slicesOf returns the EndpointSlices of a Service from the informer's index.
func (c *Controller) slicesOf(nn types.NamespacedName) ([]*service.Slice, error) {
	objs, err := c.sliceInformer.GetIndexer().ByIndex(byServiceIndex, nn.String())
	if err != nil {
		return nil, err
	}
	eps := make([]*service.Slice, 0, len(objs))
	for _, o := range objs {
		eps = append(eps, o.(*service.Slice))
	}
	return eps, nil
}

func (c *Controller) syncService(nn types.NamespacedName) error {
	start := time.Now()
	svc, eps, err := c.lookup(nn)
	if err != nil {
		return err
	}
	dirty, terr := c.builder.SetCompact(nn, svc, eps)
	if terr != nil {
		c.reportInvalid(svc, terr)
	}
	for _, f := range c.unwritten[nn] {
		if !slices.Contains(dirty, f) {
			dirty = append(dirty, f)
		}
	}
	if c.opts.OnService != nil {
		c.opts.OnService(nn, svc, eps)
	}
	err = c.rec.ApplyWith(c.builder.Desired, c.builder.Options, dirty)
	c.observe("service", start, err)
	c.m.frontends.Set(float64(c.builder.Len()))
	if err != nil {
		c.unwritten[nn] = dirty
		c.reportMapError(svc, err)
	} else {
		delete(c.unwritten, nn)
	}
	return err
}

func (c *Controller) fullSync() error {
	start := time.Now()
	seen := map[types.NamespacedName]bool{}
	list := c.svcInformer.GetStore().List()
	first := !c.synced.Load()
	if first {
		c.report(func(p *FirstSync) { p.Services, p.Translated, p.Frontends = len(list), 0, 0 })
	}
	for i, o := range list {
		if first && i > 0 && i%progressEvery == 0 {
			c.report(func(p *FirstSync) { p.Translated = i })
		}
		s := o.(*service.Service)
		nn := s.Key()
		seen[nn] = true
		eps, err := c.slicesOf(nn)
		if err != nil {
			return err
		}
		if _, terr := c.builder.SetCompact(nn, s, eps); terr != nil {
			c.reportInvalid(s, terr)
		}
		if c.opts.OnService != nil {
			c.opts.OnService(nn, s, eps)
		}
	}
	// Services deleted while we were not looking.
	for nn := range c.builder.Services() {
		if !seen[nn] {
			c.builder.SetCompact(nn, nil, nil)
			if c.opts.OnService != nil {
				c.opts.OnService(nn, nil, nil)
			}
		}
	}
	desired := c.builder.State()
	c.m.frontends.Set(float64(len(desired)))
	if first {
		c.report(func(p *FirstSync) { p.Translated, p.Frontends = len(list), len(desired) })
	}
	err := c.rec.SyncWith(desired, c.builder.Options)
	c.observe("full", start, err)
	c.log.Info("full sync", zap.Int("services", len(seen)), zap.Int("frontends", len(desired)),
		zap.Duration("took", time.Since(start)), zap.Error(err))
	if first {
		if err == nil {
			c.synced.Store(true)
		}
		c.report(func(p *FirstSync) { p.Err, p.Done = err, err == nil })
	}
	return err
}

// SetNode changes what the controller knows of this node (its addresses, on which NodePorts
// are served, and its zone, for topology hints) while it runs. The change is applied by the
// worker, followed by a full sync that re-translates every Service: NodePort frontends on an
// address that went are removed, and ones on a new address added.
func (c *Controller) SetNode(n service.Node) {
	c.nodeMu.Lock()
	c.node = &n
	c.nodeMu.Unlock()
	c.queue.Add(fullSyncKey)
}

// applyNode hands the builder the node SetNode gave, if any. Worker only.
func (c *Controller) applyNode() {
	c.nodeMu.Lock()
	n := c.node
	c.node = nil
	c.nodeMu.Unlock()
	if n == nil {
		return
	}
	c.opts.Translator.Node = *n
	c.builder.SetTranslator(c.opts.Translator)
	c.log.Info("node changed: translating every Service again", zap.String("node", n.Name),
		zap.String("zone", n.Zone), zap.Stringers("addresses", n.Addrs))
}

func (c *Controller) observe(kind string, start time.Time, err error) {
	c.m.syncSeconds.WithLabelValues(kind).Observe(time.Since(start).Seconds())
	result := "ok"
	if err != nil {
		result = "error"
	}
	c.m.syncs.WithLabelValues(kind, result).Inc()
}

func (c *Controller) reportInvalid(svc *service.Service, err error) {
	c.m.invalid.Inc()
	c.log.Warn("service has fields tern cannot serve; serving the rest", zap.Error(err))
	if c.opts.Recorder != nil && svc != nil {
		c.opts.Recorder.Eventf(svc.Ref(), corev1.EventTypeWarning, "TernInvalidService", "%v", err)
	}
}

func (c *Controller) reportMapError(svc *service.Service, err error) {
	if c.opts.Recorder == nil || svc == nil {
		return
	}
	reason := "TernLoadBalancerSyncFailed"
	if errors.Is(err, unix.E2BIG) { // the kernel's answer to an update of a full map
		reason = "TernLoadBalancerMapFull"
	}
	c.opts.Recorder.Eventf(svc.Ref(), corev1.EventTypeWarning, reason,
		"could not program the load balancer on this node (will retry): %v", err)
}
