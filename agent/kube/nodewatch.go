package kube

import (
	"context"
	"net/netip"
	"slices"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/tern-net/tern/service"
)

// nodeAddrCheckInterval is how often the node's addresses are read again without a netlink
// event: the safety net for a missed event (the socket's buffer overflowed, the subscription
// failed) and for what no address event announces (an ENI link the pool now holds).
const nodeAddrCheckInterval = 30 * time.Second

// addrWatch follows the node's addresses (the ones NodePorts are served on): it reads them
// again on every netlink address event in its namespace and every interval, and calls
// onChange when the list differs from the last one.
type addrWatch struct {
	// ns is the namespace whose address events wake the watch; netns.None() is the
	// caller's (the agent's, the node's).
	ns       netns.NsHandle
	interval time.Duration
	read     func() []netip.Addr
	onChange func([]netip.Addr)
	log      *zap.Logger
}

// run watches until ctx ends; last is the list the caller already has.
func (w addrWatch) run(ctx context.Context, last []netip.Addr) {
	events := make(chan netlink.AddrUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	opts := netlink.AddrSubscribeOptions{ErrorCallback: func(err error) {
		if ctx.Err() != nil {
			return // closing the subscription at the end fails its pending receive
		}
		w.log.Warn("netlink address subscription error; node addresses are still re-read every interval", zap.Error(err))
	}}
	if w.ns.IsOpen() {
		opts.Namespace = &w.ns
	}
	if err := netlink.AddrSubscribeWithOptions(events, done, opts); err != nil {
		w.log.Warn("cannot subscribe to address changes; node addresses are re-read every interval only",
			zap.Duration("interval", w.interval), zap.Error(err))
		events = nil
	}
	tick := time.NewTicker(w.interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-events:
			if !ok {
				// The subscription ended (its socket failed): keep the periodic check.
				w.log.Warn("netlink address subscription closed; node addresses are re-read every interval only",
					zap.Duration("interval", w.interval))
				events = nil
				continue
			}
		case <-tick.C:
		}
		now := w.read()
		if !slices.Equal(now, last) {
			w.log.Info("node addresses changed", zap.Stringers("from", last), zap.Stringers("to", now))
			last = now
			w.onChange(now)
		}
	}
}

// watchZone follows this node's topology.kubernetes.io/zone label through an informer on
// the one Node (the cloud controller manager may set it after the agent started) and calls
// onChange with each new value.
func watchZone(ctx context.Context, client kubernetes.Interface, node, last string, onChange func(string)) {
	factory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", node).String()
		}))
	inf := factory.Core().V1().Nodes().Informer()
	seen := func(obj any) {
		n, ok := obj.(*corev1.Node)
		if !ok {
			return
		}
		if z := n.Labels[corev1.LabelTopologyZone]; z != last {
			last = z
			onChange(z)
		}
	}
	// The handler's calls are serialised by the informer, so last needs no lock.
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: seen, UpdateFunc: func(_, obj any) { seen(obj) }})
	inf.Run(ctx.Done())
}

// followNode keeps the service controller's view of this node current: its addresses
// (NodePort frontends on an address added after start, none left on one removed) and its
// zone (topology hints). kube-proxy reads both once at start; an operator adding a secondary
// address or the cloud labelling the Node late should not need an agent restart.
func (s *serviceLB) followNode(ctx context.Context, start service.Node) {
	s.node = start
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		w := addrWatch{ns: netns.None(), interval: nodeAddrCheckInterval, read: s.deps.NodeAddrs, log: s.log,
			onChange: func(a []netip.Addr) { s.updateNode(func(n *service.Node) { n.Addrs = a }) }}
		w.run(ctx, start.Addrs)
	}()
	go func() {
		defer s.wg.Done()
		watchZone(ctx, s.client, start.Name, start.Zone, func(z string) {
			s.log.Info("node zone changed", zap.String("zone", z))
			s.updateNode(func(n *service.Node) { n.Zone = z })
		})
	}()
}

func (s *serviceLB) updateNode(change func(*service.Node)) {
	// Under the lock, so that two changes reach the controller in the order they were made.
	s.nodeMu.Lock()
	defer s.nodeMu.Unlock()
	change(&s.node)
	s.ctl.SetNode(s.node)
}
