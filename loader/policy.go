package loader

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// Typed names for the NetworkPolicy maps' keys and values (bpf/lib/policy.h).
type (
	PolicyKey       = PodPolicyKey
	PolicyValue     = PodPolicyValue
	PolicyIsoValue  = PodPolicyIsoValue
	PolicyCIDRKey   = PodPolicyCidrKey
	PolicyCIDRValue = PodPolicyCidrValue
)

// Conntrack policy verdict bits (enum ct_policy_flag in bpf/lib/conntrack.h).
const (
	CTPolicyOut = 1 << 0
	CTPolicyIn  = 1 << 1
)

// PolicyMaps are the NetworkPolicy maps. The agent's policy reconciler owns all three.
type PolicyMaps struct {
	Rules     *ebpf.Map // tern_policy
	Isolation *ebpf.Map // tern_policy_isolation
	CIDRs     *ebpf.Map // tern_policy_cidrs
}

// PolicyMaps gives access to the datapath's NetworkPolicy maps.
func (d *Datapath) PolicyMaps() *PolicyMaps {
	return &PolicyMaps{Rules: d.objs.TernPolicy, Isolation: d.objs.TernPolicyIsolation, CIDRs: d.objs.TernPolicyCidrs}
}

// privateFlows is the conntrack size of a private datapath: a simulation opens a few flows
// per probe, and a full-size LRU map would cost tens of MiB of kernel memory per run.
const privateFlows = 65536

// LoadPrivate loads the pod programs with maps of their own: nothing is pinned, nothing is
// attached, and everything goes away with Close. It is for running the real programs with
// BPF_PROG_TEST_RUN next to (or without) an agent: the policy simulator. Load-time
// variables keep their C defaults.
func LoadPrivate() (*Datapath, error) {
	spec, err := LoadPod()
	if err != nil {
		return nil, fmt.Errorf("parse embedded pod BPF object: %w", err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	spec.Maps[PodMapTernConntrack].MaxEntries = privateFlows
	d := &Datapath{}
	d.cfg.setDefaults()
	d.cfg.PinRoot = ""
	if err := spec.LoadAndAssign(&d.objs, nil); err != nil {
		return nil, fmt.Errorf("load pod programs with private maps (needs CAP_BPF, or root): %w", err)
	}
	return d, nil
}
