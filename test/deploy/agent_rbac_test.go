//go:build linux

package deploy_test

import (
	"testing"

	"github.com/tern-net/tern/test/deploy/agentrun"
)

// TestAgentRunsWithItsServiceAccount runs the real agent in the lab with deploy/manifests'
// ServiceAccount, RBAC, kubeconfig and capability list (agentrun.WithServiceAccount says
// what it checks). test/deploy/helm runs the same with the chart's rendered objects.
func TestAgentRunsWithItsServiceAccount(t *testing.T) {
	agentrun.WithServiceAccount(t, load(t))
}
