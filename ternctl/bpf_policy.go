package ternctl

import (
	"fmt"
	"net/netip"

	"github.com/spf13/cobra"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/policy/policymap"
)

func bpfPolicyCommand(e *env) *cobra.Command {
	get := &cobra.Command{
		Use:   "get NAMESPACE/POD|ADDRESS",
		Short: "What the policy maps enforce for a local pod: isolation, allow entries by policy, counters",
		Long: `bpf policy get reads the pinned NetworkPolicy maps (tern_policy, tern_policy_isolation,
tern_policy_cidrs, tern_policy_names, tern_policy_stats) for a pod on this node, so it works
while the agent is down (give the pod's address then; NAMESPACE/POD asks the agent). Peers
are shown as the maps know them: an ipBlock prefix, or the addresses tern_ipcache gives the
identity.`,
		Example: `  ternctl bpf policy get 10.0.0.12
  ternctl bpf policy get default/web -o json`,
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: e.completePods,
		RunE: func(cmd *cobra.Command, args []string) error {
			addr, err := e.podAddr(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return e.bpfPolicyGet(cmd, addr, args[0])
		},
	}
	return mapGroup("policy", "NetworkPolicy maps (tern_policy and friends)", get)
}

func (e *env) bpfPolicyGet(cmd *cobra.Command, addr netip.Addr, arg string) error {
	m, err := e.openMaps()
	if err != nil {
		return err
	}
	defer m.Close()
	eps, err := m.DumpEndpoints()
	if err != nil {
		return withCode(ExitFailure, err)
	}
	var (
		ep    loader.EndpointValue
		found bool
	)
	for _, v := range eps {
		if loader.BEToAddr(v.Addr) == addr {
			ep, found = v, true
		}
	}
	if !found {
		return withCode(ExitFailure, fmt.Errorf("%s (%s) is no pod endpoint of this node (tern_endpoints); see ternctl bpf endpoint list", arg, addr))
	}
	pm := &loader.PolicyMaps{}
	open := e.openMap
	if pm.Rules, err = open(loader.PodMapTernPolicy); err != nil {
		return err
	}
	defer pm.Rules.Close()
	if pm.Isolation, err = open(loader.PodMapTernPolicyIsolation); err != nil {
		return err
	}
	defer pm.Isolation.Close()
	if pm.CIDRs, err = open(loader.PodMapTernPolicyCidrs); err != nil {
		return err
	}
	defer pm.CIDRs.Close()
	if pm.Names, err = open(loader.PodMapTernPolicyNames); err != nil {
		return err
	}
	defer pm.Names.Close()
	if pm.Stats, err = open(loader.PodMapTernPolicyStats); err != nil {
		return err
	}
	defer pm.Stats.Close()
	v, err := policymap.PinnedView(pm, m.IPCache, ep)
	if err != nil {
		return withCode(ExitFailure, err)
	}
	if names := e.podNames(cmd.Context()); names != nil {
		v.Pod = names[addr]
	}
	return e.render(v, func() *table { return policyTable(v) })
}
