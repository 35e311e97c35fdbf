package agent

import (
	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/endpoint"
	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/loader"
)

// markExclusive sets EP_F_EXCLUSIVE on the endpoint of an attaching pod that owns a whole
// ENI: the agent's own allocation for the pod, not the plugin's word, decides (kind eni,
// with the address being attached). The pod programs translate that pod's Service flows to
// remote backends to the node's address (bpf/lib/exclusive.h). The flag stays in the map
// across agent restarts (the registry starts from it), as the pod's kind does.
func (a *Agent) markExclusive(req api.AttachRequest, ep *endpoint.Endpoint) {
	if a.cfg.IPAM.Off() || req.Namespace == "" || req.Name == "" {
		return
	}
	pool := a.startedPool()
	if pool == nil {
		return
	}
	key, e := podKey(req.PodRef)
	if e != nil {
		return
	}
	if al, ok := pool.Allocations()[key]; ok && al.Kind == ipam.KindENI && al.IP == ep.Addr {
		ep.Flags |= loader.EndpointFlagExclusive
	}
}
