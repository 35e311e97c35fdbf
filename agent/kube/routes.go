package kube

import (
	"context"
	"math/rand/v2"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"

	"github.com/tern-net/tern/ipam"
)

// The VPC route mode's clean-up of departed nodes. With a cloud provider,
// kube-controller-manager's route controller deletes the route of a Node that is deleted;
// tern's lab and many self-managed clusters run no cloud-controller-manager, so the agents do
// it: every agent watches Nodes, and the one whose node name sorts first among the Nodes that
// exist deletes the entries tern made for Nodes that no longer exist (ipam.DeleteDepartedRoutes:
// entries of this cluster only, matched by their description). One node acts, so a delete
// costs one API call, not one per node; if that node goes, the next name takes over. A
// node's own agent never deletes its own entry (a restarting agent must not cut its pods
// off); a Node deleted while its instance still runs loses its route, as with the CCM.

// startRouteJanitor runs the clean-up on every Node delete and every RouteCheckInterval.
func (c *Component) startRouteJanitor(ctx context.Context, rp *ipam.RoutePool) {
	factory := informers.NewSharedInformerFactory(c.client, 0)
	nodes := factory.Core().V1().Nodes().Informer()
	kick := make(chan struct{}, 1)
	_, _ = nodes.AddEventHandler(cache.ResourceEventHandlerFuncs{DeleteFunc: func(any) {
		select {
		case kick <- struct{}{}:
		default:
		}
	}})
	c.wg.Add(2)
	go func() { defer c.wg.Done(); nodes.Run(ctx.Done()) }()
	go func() {
		defer c.wg.Done()
		if !cache.WaitForCacheSync(ctx.Done(), nodes.HasSynced) {
			return
		}
		every := time.Duration(c.deps.Config.RouteCheckInterval)
		if every <= 0 {
			every = time.Minute
		}
		rnd := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0x6a616e))
		for {
			c.cleanDepartedRoutes(ctx, rp, nodes.GetStore().List())
			t := time.NewTimer(ipam.Jitter(every, ipam.LoopJitter, rnd))
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-kick:
				t.Stop()
			case <-t.C:
			}
		}
	}()
}

func (c *Component) cleanDepartedRoutes(ctx context.Context, rp *ipam.RoutePool, objs []any) {
	self := c.deps.Config.NodeName
	live := map[string]bool{}
	first := ""
	for _, o := range objs {
		n, ok := o.(*corev1.Node)
		if !ok || n.DeletionTimestamp != nil {
			continue
		}
		live[n.Name] = true
		if first == "" || n.Name < first {
			first = n.Name
		}
	}
	// Without our own Node in the view, the view is not one to delete by.
	if !live[self] || first != self {
		return
	}
	table, _, _ := rp.Route()
	deleted, err := ipam.DeleteDepartedRoutes(ctx, c.deps.RouteCloud, table, c.deps.Config.ClusterID, live, c.log)
	if err != nil {
		c.log.Warn("could not delete every route entry of departed nodes; retrying next period", zap.Error(err))
	}
	for _, e := range deleted {
		c.log.Info("route of a departed node deleted", zap.String("entry", e.ID), zap.Stringer("podCIDR", e.Destination))
	}
}
