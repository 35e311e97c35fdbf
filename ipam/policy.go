package ipam

import (
	"math/rand/v2"
	"sort"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/eniconfig"
)

// Capacity is how many pods an instance type can address in ENIIP mode.
type Capacity struct {
	InstanceType string
	// ENIs usable for pods: EniQuantity less the primary ENI, which belongs to the node.
	ENIs int
	// IPsPerENI usable for pods: EniPrivateIpAddressQuantity, the ENI's own primary address
	// included — a secondary ENI's primary serves a pod like its secondary addresses, as in
	// Terway and in the published planning table (see docs/ipam.md).
	IPsPerENI int
	// MaxPods = ENIs × IPsPerENI.
	MaxPods int
}

// CapacityOf computes the ENIIP pod capacity: (EniQuantity − 1) × EniPrivateIpAddressQuantity.
func CapacityOf(l aliyun.Limits) Capacity {
	c := Capacity{InstanceType: l.InstanceType, ENIs: max(l.ENIs-1, 0), IPsPerENI: max(l.IPsPerENI, 0)}
	c.MaxPods = c.ENIs * c.IPsPerENI
	return c
}

// orderVSwitches returns the IDs of the candidates that may take a new ENI, in the order to try
// them: vSwitches without a free address (a new ENI needs one, its primary, which serves a pod)
// or marked exhausted are skipped; "ordered" sorts by free
// addresses (most first, config order breaking ties), "random" shuffles.
func orderVSwitches(cands []aliyun.VSwitch, policy string, exhausted map[string]bool, rnd *rand.Rand) []string {
	var ok []aliyun.VSwitch
	for _, v := range cands {
		if v.Available >= 1 && !exhausted[v.ID] {
			ok = append(ok, v)
		}
	}
	switch policy {
	case eniconfig.VSwitchOrdered:
		sort.SliceStable(ok, func(i, j int) bool { return ok[i].Available > ok[j].Available })
	default:
		if rnd != nil {
			rnd.Shuffle(len(ok), func(i, j int) { ok[i], ok[j] = ok[j], ok[i] })
		}
	}
	ids := make([]string, len(ok))
	for i, v := range ok {
		ids[i] = v.ID
	}
	return ids
}

// batchSize is how many addresses the next AssignPrivateIpAddresses asks for.
//
// With pods waiting it asks for all of them plus enough to leave max_pool_size idle afterwards,
// so that a burst of pods is served by a few calls of up to 10 rather than one call per pod.
// With nobody waiting it only tops the pool up to min_pool_size. It never exceeds room (the
// free slots of the chosen ENI) or aliyun.MaxIPsPerCall; 0 means nothing to do.
func batchSize(waiting, idle, minPool, maxPool, room int) int {
	var n int
	if waiting > 0 {
		n = max(waiting-idle, 0)
		if n > 0 {
			n = waiting + maxPool - idle
		}
	} else {
		n = minPool - idle
	}
	return max(0, min(n, room, aliyun.MaxIPsPerCall))
}

// reclaimCount is how many idle addresses to give back: everything above max_pool_size, and,
// when idle addresses expire (idle_ip_reclaim_after), the expired ones down to min_pool_size.
func reclaimCount(idle, expired, minPool, maxPool int) int {
	n := max(idle-maxPool, 0)
	if expired > 0 {
		n = max(n, min(expired, idle-minPool))
	}
	return max(n, 0)
}
