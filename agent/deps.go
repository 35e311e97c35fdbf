package agent

import (
	"context"
	"net/netip"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/agent/readiness"
	"github.com/tern-net/tern/bandwidth"
	"github.com/tern-net/tern/endpoint"
	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/service/lbmap"
)

// Deps are the agent's parts a component is built from. Run builds each registered component
// (AddComponent) once these exist: the datapath loaded, the endpoint registry and the LB maps'
// reconciler open, the pool started. A component gets them at construction and never asks the
// agent for a part that may not be there yet. Pool and RouteCloud are nil only where the
// configuration has none (ipam.mode none; outside the VPC route mode).
type Deps struct {
	Config    Config
	Log       *zap.Logger
	Registry  *prometheus.Registry // components register their metrics here
	Readiness *readiness.Registry  // components register what must be ready before pods

	Datapath      *loader.Datapath
	Endpoints     *endpoint.Registry // the node's pods (tern_endpoints, tern_ipcache)
	Services      *lbmap.Reconciler  // the LB maps' one writer: Services and hostPorts
	Pool          ipam.Allocator     // the address source; nil with ipam.mode none
	RouteCloud    aliyun.RouteCloud  // the VPC route API in VPC route mode, else nil
	BandwidthMode bandwidth.Mode

	// What the agent does for components: its node addresses (primary NIC and ENIs, read when
	// called), address GC, and the hooks a component registers in its Start.
	NodeAddrs     func() []netip.Addr
	GC            func(ctx context.Context, keep func(ipam.PodKey) bool) (GCResult, error)
	OnAllocate    func(func(ipam.PodKey, error))
	OnEndpoint    func(EndpointHooks)
	SetPolicyView func(func(namespace, name string) (api.PolicyView, *api.Error))
}

// ComponentFactory builds a component from the agent's started parts; Run calls it, then the
// component's Start.
type ComponentFactory func(Deps) (Component, error)

// deps collects the started parts. Run calls it after the pool is up.
func (a *Agent) deps() Deps {
	a.mu.Lock()
	defer a.mu.Unlock()
	return Deps{Config: a.cfg, Log: a.log, Registry: a.reg, Readiness: a.readiness,
		Datapath: a.dp, Endpoints: a.endpoints, Services: a.svcRec, Pool: a.pool, RouteCloud: a.routes,
		BandwidthMode: a.bwMode,
		NodeAddrs:     a.NodeAddrs, GC: a.GC, OnAllocate: a.OnAllocate, OnEndpoint: a.OnEndpoint,
		SetPolicyView: a.SetPolicyView}
}
