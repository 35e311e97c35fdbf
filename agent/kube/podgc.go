package kube

import (
	"context"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/tern-net/tern/ipam"
)

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
		res, err := c.deps.GC(ctx, func(k ipam.PodKey) bool {
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
			c.report.Changed()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
