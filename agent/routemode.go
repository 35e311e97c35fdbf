package agent

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"go.uber.org/zap"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/store"
)

// newAllocator builds the node's address source for the configured daemon mode.
func (a *Agent) newAllocator(ctx context.Context, cloud *aliyun.Client, st *store.Store, eniCfg eniconfig.Config) (ipam.Allocator, error) {
	if mode, _ := a.cfg.Mode(); mode != ModeVPC {
		return a.withKinds(ctx, cloud, st, eniCfg, func(otherENIs func() int) (ipam.Allocator, error) {
			pool, err := ipam.New(ipam.Options{
				Cloud: cloud, Store: st, Config: eniCfg, InstanceID: a.cfg.InstanceID, NodeName: a.cfg.NodeName,
				ClusterID: a.cfg.ClusterID, Logger: a.log.Named("ipam"), AllocateWait: time.Duration(a.cfg.AllocateWait),
				MaintainInterval: time.Duration(a.cfg.MaintainInterval), OtherENIs: otherENIs, ListingGrace: time.Duration(a.cfg.ListingGrace),
				LivePods: a.livePods,
			})
			if err != nil {
				return nil, err
			}
			// The wrappers (fixed IPs: agent/fixedip.go) go on the ENIIP pool itself, under
			// the kinds' ipam.Node: they need the *ipam.Pool, and only ENIIP pods are theirs.
			return a.wrapAllocator(pool, cloud)
		})
	}
	cidr, err := a.podCIDR(ctx)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	a.routes = cloud
	a.mu.Unlock()
	a.log.Info("VPC route mode", zap.Stringer("podCIDR", cidr), zap.String("routeTable", a.cfg.RouteTableID))
	return ipam.NewRoutePool(ipam.RouteOptions{
		Cloud: cloud, Routes: cloud, Store: st, InstanceID: a.cfg.InstanceID, NodeName: a.cfg.NodeName,
		ClusterID: a.cfg.ClusterID, PodCIDR: cidr, RouteTableID: a.cfg.RouteTableID,
		CheckInterval: time.Duration(a.cfg.RouteCheckInterval), ListingGrace: time.Duration(a.cfg.ListingGrace), Logger: a.log.Named("ipam"),
	})
}

// podCIDR is the node's pod CIDR: the Node's spec.podCIDR (kube-controller-manager's node
// IPAM writes it, possibly after the node registered: the agent waits for it), or the
// configured podCIDR without a kubeconfig.
func (a *Agent) podCIDR(ctx context.Context) (netip.Prefix, error) {
	var fromConfig netip.Prefix
	if a.cfg.PodCIDR != "" {
		fromConfig = netip.MustParsePrefix(a.cfg.PodCIDR) // checked by Validate
	}
	if a.cfg.Kubeconfig == "" {
		return fromConfig, nil
	}
	rc, err := clientcmd.BuildConfigFromFlags("", a.cfg.Kubeconfig)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("VPC mode: load kubeconfig %s to read the Node's podCIDR: %w", a.cfg.Kubeconfig, err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("VPC mode: Kubernetes client: %w", err)
	}
	delay := 200 * time.Millisecond
	for {
		n, err := client.CoreV1().Nodes().Get(ctx, a.cfg.NodeName, metav1.GetOptions{})
		switch {
		case err != nil:
			a.log.Warn("VPC mode: cannot read this Node yet; retrying", zap.Error(err))
		case n.Spec.PodCIDR == "":
			a.log.Info("VPC mode: the Node has no spec.podCIDR yet (kube-controller-manager --allocate-node-cidrs assigns it); waiting")
		default:
			p, err := netip.ParsePrefix(n.Spec.PodCIDR)
			if err != nil || !p.Addr().Is4() {
				return netip.Prefix{}, fmt.Errorf("VPC mode: Node %s has podCIDR %q, not an IPv4 CIDR", a.cfg.NodeName, n.Spec.PodCIDR)
			}
			if fromConfig.IsValid() && fromConfig != p.Masked() {
				return netip.Prefix{}, fmt.Errorf("VPC mode: the agent config says podCIDR %s but Node %s has %s; remove podCIDR from the config", fromConfig, a.cfg.NodeName, p)
			}
			return p.Masked(), nil
		}
		select {
		case <-ctx.Done():
			return netip.Prefix{}, fmt.Errorf("VPC mode: waiting for Node %s's podCIDR: %w", a.cfg.NodeName, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(2*delay, 5*time.Second)
	}
}
