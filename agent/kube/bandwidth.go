package kube

import (
	"context"
	"fmt"
	"net/netip"
	"sync"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/bandwidth"
)

// Pod bandwidth annotations reach the agent through its watch of the node's pods (not CNI
// args): a watch sees an annotation changed on a running pod, which CNI ADD never would,
// and it is the same path Terway takes. The pod's address comes from the node's own IPAM
// allocation (known before the pod's status has it), the host veth from the endpoint
// registry; bandwidth.Manager joins them.

// startBandwidth builds the bandwidth manager and feeds it the pods' annotations.
func (c *Component) startBandwidth(ctx context.Context) error {
	dp := c.deps.Datapath
	reg := c.deps.Endpoints
	if reg == nil {
		return fmt.Errorf("bandwidth manager: the endpoint registry is not loaded")
	}
	mgr, err := bandwidth.NewManager(dp.Maps(), bandwidth.Options{
		Mode: c.deps.BandwidthMode,
		Endpoints: func() []bandwidth.Endpoint {
			eps := reg.List()
			out := make([]bandwidth.Endpoint, 0, len(eps))
			for _, e := range eps {
				out = append(out, bandwidth.Endpoint{IfIndex: e.IfIndex, Addr: e.Addr})
			}
			return out
		},
		PodAddrs: func() map[string]netip.Addr {
			pool := c.deps.Pool
			if pool == nil {
				return nil
			}
			out := map[string]netip.Addr{}
			for k, al := range pool.Allocations() {
				out[k.Namespace+"/"+k.Name] = al.IP
			}
			return out
		},
		Logger: c.log.Named("bandwidth"),
	})
	if err != nil {
		return fmt.Errorf("bandwidth manager: %w", err)
	}
	for _, col := range mgr.Collectors() {
		if err := c.deps.Registry.Register(col); err != nil {
			return fmt.Errorf("bandwidth manager metrics: %w", err)
		}
	}
	c.deps.OnEndpoint(agent.EndpointHooks{
		Attached: func(int) { mgr.Sync() },
		Detached: mgr.Forget,
	})
	w := &bandwidthWatch{c: c, mgr: mgr, seen: map[string]string{}}
	h, err := c.pods.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { w.pod(o) },
		UpdateFunc: func(_, o any) { w.pod(o) },
		DeleteFunc: w.deleted,
	})
	if err != nil {
		return fmt.Errorf("bandwidth manager: watch pods: %w", err)
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		if cache.WaitForCacheSync(ctx.Done(), h.HasSynced) {
			mgr.MarkSynced()
			c.log.Info("bandwidth manager synced with the node's pods", zap.String("mode", string(c.deps.BandwidthMode)))
		}
	}()
	return nil
}

// bandwidthWatch turns pod events into the manager's desired state.
type bandwidthWatch struct {
	c   *Component
	mgr *bandwidth.Manager

	mu   sync.Mutex
	seen map[string]string // namespace/name → the bad annotation values last reported
}

func (w *bandwidthWatch) pod(o any) {
	p, ok := o.(*corev1.Pod)
	if !ok {
		return
	}
	key := p.Namespace + "/" + p.Name
	if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		w.forget(key)
		return
	}
	lim, err := bandwidth.FromAnnotations(p.Annotations)
	w.report(p, key, err)
	var addr netip.Addr
	if a, perr := netip.ParseAddr(p.Status.PodIP); perr == nil {
		addr = a
	}
	w.mgr.SetPod(key, addr, lim)
}

// report records one Warning Event per pod and bad value: the informer hands every status
// update of the pod to pod(), which must not repeat the Event each time.
func (w *bandwidthWatch) report(p *corev1.Pod, key string, err error) {
	sig := ""
	if err != nil {
		sig = p.Annotations[bandwidth.EgressAnnotation] + "\x00" + p.Annotations[bandwidth.IngressAnnotation]
	}
	w.mu.Lock()
	last := w.seen[key]
	if sig == "" {
		delete(w.seen, key)
	} else {
		w.seen[key] = sig
	}
	w.mu.Unlock()
	if err == nil || sig == last {
		return
	}
	w.mgr.InvalidAnnotation()
	w.c.log.Warn("pod bandwidth annotation ignored", zap.String("pod", key), zap.Error(err))
	w.c.recorder.Event(p, corev1.EventTypeWarning, "TernBandwidthInvalid",
		boundEventMessage(err.Error()+"; the pod runs without this limit until the annotation is fixed"))
}

func (w *bandwidthWatch) deleted(o any) {
	if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = t.Obj
	}
	if p, ok := o.(*corev1.Pod); ok {
		w.forget(p.Namespace + "/" + p.Name)
	}
}

func (w *bandwidthWatch) forget(key string) {
	w.mu.Lock()
	delete(w.seen, key)
	w.mu.Unlock()
	w.mgr.DeletePod(key)
}
