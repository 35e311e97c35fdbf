package ipam

import (
	"context"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tern-net/tern/ipam/eniconfig"
)

// Allocator is what the agent needs of a node's address source, whichever mode gives pods
// their addresses: the ENIIP Pool (secondary addresses of ENIs) or the RoutePool (the node's
// pod CIDR, reached through a VPC route entry).
type Allocator interface {
	// Start prepares the source (reconciles with the cloud) and starts its background work.
	Start(ctx context.Context) error
	// Stop ends the background work; the store stays open.
	Stop()
	// Allocate gives key an address, the same one for the same key, persisted before it
	// returns.
	Allocate(ctx context.Context, key PodKey) (Allocation, error)
	// Release gives key's address back; a key without one is not an error.
	Release(ctx context.Context, key PodKey) error
	// Allocations lists what pods hold now.
	Allocations() map[PodKey]Allocation
	// GC releases the allocations of pods (namespace/name) not in livePods and repairs the
	// cloud side.
	GC(ctx context.Context, livePods func() map[string]bool) (GCResult, error)
	// Status is the node-level view for ternctl and the Node report.
	Status() Status
	// UpdateConfig applies a reloaded eni_conf.
	UpdateConfig(cfg eniconfig.Config)
	// Collectors are the source's metrics.
	Collectors() []prometheus.Collector
}

var (
	_ Allocator = (*Pool)(nil)
	_ Allocator = (*RoutePool)(nil)
)
