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
	PolicyName      = PodPolicyName
)

// Policy slots and verdicts (bpf/lib/policy.h): a slot names a NetworkPolicy in
// tern_policy_names; tern_policy_stats counts per (slot, direction, verdict).
const (
	PolicySlots        = 4096
	PolicyDirIsolator  = 0x80 // or'ed into PolicyKey.Dir: the entry names the isolating policy
	PolicyVerdictAllow = 0
	PolicyVerdictDeny  = 1
	policyNameLen      = 320
)

// PolicyStatsIndex is tern_policy_stats' index of (slot, dir 1 ingress or 2 egress, verdict).
func PolicyStatsIndex(slot uint32, dir uint8, verdict uint8) uint32 {
	return (slot&(PolicySlots-1))<<2 | uint32((dir-1)&1)<<1 | uint32(verdict&1)
}

// NewPolicyName encodes "namespace/name" for tern_policy_names (longer names are cut; a
// Kubernetes name fits).
func NewPolicyName(s string) PolicyName {
	var n PolicyName
	for i := 0; i < len(s) && i < policyNameLen-1; i++ {
		n.Name[i] = int8(s[i])
	}
	return n
}

// String is the name a PolicyName holds.
func (n PolicyName) String() string {
	b := make([]byte, 0, 64)
	for _, c := range n.Name {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}

// Conntrack policy verdict bits (enum ct_policy_flag in bpf/lib/conntrack.h).
const (
	CTPolicyOut = 1 << 0
	CTPolicyIn  = 1 << 1
)

// PolicyMaps are the NetworkPolicy maps. The agent's policy reconciler owns all of them
// (of Stats, only the zeroing of a slot it gives to a new policy).
type PolicyMaps struct {
	Rules     *ebpf.Map // tern_policy
	Isolation *ebpf.Map // tern_policy_isolation
	CIDRs     *ebpf.Map // tern_policy_cidrs
	Names     *ebpf.Map // tern_policy_names
	Stats     *ebpf.Map // tern_policy_stats
}

// PolicyMaps gives access to the datapath's NetworkPolicy maps.
func (d *Datapath) PolicyMaps() *PolicyMaps {
	return &PolicyMaps{Rules: d.objs.TernPolicy, Isolation: d.objs.TernPolicyIsolation, CIDRs: d.objs.TernPolicyCidrs,
		Names: d.objs.TernPolicyNames, Stats: d.objs.TernPolicyStats}
}

// PolicyCounters are a slot's judged packets and bytes, summed over CPUs.
type PolicyCounters struct {
	AllowedPackets, AllowedBytes uint64
	DeniedPackets, DeniedBytes   uint64
}

// ReadPolicyStats sums tern_policy_stats for slot in dir (1 ingress, 2 egress).
func ReadPolicyStats(stats *ebpf.Map, slot uint32, dir uint8) (PolicyCounters, error) {
	var c PolicyCounters
	for _, verdict := range []uint8{PolicyVerdictAllow, PolicyVerdictDeny} {
		var per []MetricsValue
		if err := stats.Lookup(PolicyStatsIndex(slot, dir, verdict), &per); err != nil {
			return c, fmt.Errorf("read %s slot %d: %w", PodMapTernPolicyStats, slot, err)
		}
		for _, v := range per {
			if verdict == PolicyVerdictAllow {
				c.AllowedPackets += v.Packets
				c.AllowedBytes += v.Bytes
			} else {
				c.DeniedPackets += v.Packets
				c.DeniedBytes += v.Bytes
			}
		}
	}
	return c, nil
}

// ZeroPolicyStats clears a slot's counters (before the slot names another policy).
func ZeroPolicyStats(stats *ebpf.Map, slot uint32) error {
	zero := make([]MetricsValue, ebpf.MustPossibleCPU())
	for _, dir := range []uint8{1, 2} {
		for _, verdict := range []uint8{PolicyVerdictAllow, PolicyVerdictDeny} {
			if err := stats.Put(PolicyStatsIndex(slot, dir, verdict), zero); err != nil {
				return fmt.Errorf("zero %s slot %d: %w", PodMapTernPolicyStats, slot, err)
			}
		}
	}
	return nil
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
