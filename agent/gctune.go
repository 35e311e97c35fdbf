package agent

import (
	"os"
	"runtime/debug"

	"go.uber.org/zap"
)

// DefaultGCPercent is the agent's garbage-collector target when GOGC is not set: the heap may
// grow 50 % past what is live before a collection, instead of Go's 100 %. Most of the agent's
// heap is long-lived (the Service and EndpointSlice caches, the desired LB state), and what
// it allocates in the steady state is little, so collecting earlier costs little CPU while it
// keeps about a quarter of the resident memory at 10,000 Services (docs/benchmarks.md,
// "Agent memory at 10,000 Services"). Unlike a fixed memory limit it scales with the cluster:
// a bigger cluster gets a proportionally bigger heap, never a collector running flat out.
const DefaultGCPercent = 50

// TuneGC applies DefaultGCPercent unless the operator set GOGC. GOMEMLIMIT, when set (the
// Helm chart derives it from the container's memory limit, as Cilium's does), is the Go
// runtime's own and is left alone. tern-agent calls it first thing.
func TuneGC(log *zap.Logger) {
	if v, ok := os.LookupEnv("GOGC"); ok {
		log.Info("garbage collector target from GOGC", zap.String("GOGC", v))
		return
	}
	debug.SetGCPercent(DefaultGCPercent)
}
