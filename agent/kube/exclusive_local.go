package kube

import (
	"fmt"
	"net/netip"
	"slices"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/healthcheck"
)

// Exclusive-ENI pods and externalTrafficPolicy Local.
//
// An exclusive-ENI pod answers every packet that is not for the node through its own ENI.
// A NodePort flow of externalTrafficPolicy Cluster to it is translated to the node's address,
// so the answer comes back through the pod's veth and the node (bpf/lib/exclusive.h); a
// Local flow must keep the client's address, and the pod's answer to that address would
// leave by its ENI, untranslated, and never reach the client. So this node's exclusive pods
// are not local endpoints of eTP Local frontends (service.Node.Exclusive): such a frontend
// with only them on this node drops, as kube-proxy does without local endpoints, and its
// healthCheckNodePort reports no local endpoint, so a load balancer sends its clients to
// other nodes. Every Service with endpoints left out that way is counted, logged and gets a
// Warning Event, so it is never a silent black hole.

// exclusiveLocal tracks the Services whose local endpoints are left out for eTP Local.
type exclusiveLocal struct {
	mu      sync.Mutex
	skipped map[types.NamespacedName]int // ready local addresses left out, per Service
	gauge   prometheus.Gauge
}

func newExclusiveLocal(reg prometheus.Registerer) (*exclusiveLocal, error) {
	x := &exclusiveLocal{skipped: map[types.NamespacedName]int{}, gauge: prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "tern_service_exclusive_local_endpoints_skipped",
		Help: "Ready endpoints on this node left out of externalTrafficPolicy Local frontends because they are exclusive-ENI pods (they cannot answer with the client's address kept).",
	})}
	if reg != nil {
		if err := reg.Register(x.gauge); err != nil {
			return nil, fmt.Errorf("exclusive-ENI eTP Local metric: %w", err)
		}
	}
	return x, nil
}

// exclusiveAddrs are the addresses of this node's exclusive-ENI pods, sorted, from the
// endpoint registry (the agent marks them at attach from its own allocations).
func exclusiveAddrs(deps agent.Deps) []netip.Addr {
	if deps.Endpoints == nil {
		return nil
	}
	var out []netip.Addr
	for _, e := range deps.Endpoints.List() {
		if e.Flags&loader.EndpointFlagExclusive != 0 {
			out = append(out, e.Addr)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// followExclusive re-translates every Service when the node's exclusive pods change. The
// hooks run with the agent's attach lock held: updateNode only hands the controller the new
// node and queues a full sync.
func (s *serviceLB) followExclusive() {
	if s.deps.OnEndpoint == nil {
		return
	}
	changed := func(int) {
		now := exclusiveAddrs(s.deps)
		s.nodeMu.Lock()
		same := slices.Equal(now, s.node.Exclusive)
		s.nodeMu.Unlock()
		if same {
			return
		}
		s.log.Info("exclusive-ENI pods of this node changed: translating every Service again",
			zap.Stringers("exclusive", now))
		s.updateNode(func(n *service.Node) { n.Exclusive = now })
	}
	s.deps.OnEndpoint(agent.EndpointHooks{Attached: changed, Detached: changed})
}

// localReady is what the healthCheckNodePort of svc reports: its ready endpoints on this
// node, without the exclusive-ENI pods for an eTP Local Service (each such Service counted,
// logged and given a Warning Event when it starts leaving endpoints out).
func (s *serviceLB) localReady(nn types.NamespacedName, svc *service.Service, eps []*service.Slice) int {
	s.nodeMu.Lock()
	except := s.node.Exclusive
	s.nodeMu.Unlock()
	n, left := 0, 0
	if svc != nil {
		if !svc.ExternalLocal() {
			except = nil
		}
		n, left = healthcheck.LocalReadyExcept(s.deps.Config.NodeName, eps, except)
	}
	x := s.exclusive
	x.mu.Lock()
	before := x.skipped[nn]
	if left == 0 {
		delete(x.skipped, nn)
	} else {
		x.skipped[nn] = left
	}
	total := 0
	for _, v := range x.skipped {
		total += v
	}
	x.gauge.Set(float64(total))
	x.mu.Unlock()
	switch {
	case left > 0 && before == 0:
		s.log.Warn("exclusive-ENI endpoints left out of an externalTrafficPolicy Local Service on this node",
			zap.String("service", nn.String()), zap.Int("endpoints", left))
		s.recorder.Eventf(svc.Ref(), corev1.EventTypeWarning, "ExclusiveENIEndpointNotLocal",
			"%d ready endpoint(s) on node %s are exclusive-ENI pods, which answer external clients only through their own ENI: with externalTrafficPolicy Local (the client's address kept) they cannot answer, so this node does not use them for this Service's external traffic and its health check does not count them. Use externalTrafficPolicy Cluster to reach them (the pod then sees the node's address).",
			left, s.deps.Config.NodeName)
	case left == 0 && before > 0:
		s.log.Info("no exclusive-ENI endpoint left out of an externalTrafficPolicy Local Service any more",
			zap.String("service", nn.String()))
	}
	return n
}
