//go:build linux

package helm_test

import (
	"testing"

	"github.com/tern-net/tern/test/deploy/agentrun"
)

// TestChartAgentRunsWithItsServiceAccount runs the real agent in the lab with the identity
// the chart renders (default values): its ServiceAccount, ClusterRole and binding, the
// kubeconfig of its ConfigMap with a token of that ServiceAccount, and its DaemonSet's
// capability list. It serves a Service, enforces a NetworkPolicy, reports the Node and records
// pod Events, and its log never says "forbidden" (agentrun.WithServiceAccount).
// test/deploy runs the same with deploy/manifests.
func TestChartAgentRunsWithItsServiceAccount(t *testing.T) {
	agentrun.WithServiceAccount(t, render(t, nil))
}
