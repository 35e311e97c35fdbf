package policymap

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/policy"
)

// RuleView renders a compiled rule for api.PolicyRule (peer left to the caller).
func RuleView(k policy.RuleKey) api.PolicyRule {
	r := api.PolicyRule{Direction: k.Dir.String(), PeerIdentity: uint32(k.Peer), Protocol: "any", Ports: "any"}
	if k.Proto == 0 {
		return r
	}
	r.Protocol = protoName(k.Proto)
	switch {
	case k.PortBits == 0:
	case k.PortBits >= 16:
		r.Ports = strconv.Itoa(int(k.Port))
	default:
		hi := uint32(k.Port) | (uint32(1)<<(16-uint32(k.PortBits)) - 1)
		r.Ports = fmt.Sprintf("%d-%d", k.Port, hi)
	}
	return r
}

func protoName(p uint8) string {
	switch p {
	case 6:
		return "TCP"
	case 17:
		return "UDP"
	case 132:
		return "SCTP"
	}
	return strconv.Itoa(int(p))
}

// Counters reads a slot's counters in both directions.
func Counters(stats *ebpf.Map, slot uint32) (api.PolicyCounterPair, error) {
	var out api.PolicyCounterPair
	for _, dir := range []policy.Direction{policy.Ingress, policy.Egress} {
		c, err := loader.ReadPolicyStats(stats, slot, uint8(dir))
		if err != nil {
			return out, err
		}
		v := api.PolicyCounters{AllowedPackets: c.AllowedPackets, AllowedBytes: c.AllowedBytes,
			DeniedPackets: c.DeniedPackets, DeniedBytes: c.DeniedBytes}
		if dir == policy.Ingress {
			out.Ingress = v
		} else {
			out.Egress = v
		}
	}
	return out, nil
}

// SortRules orders rules for display: direction, peer, protocol, ports.
func SortRules(rs []api.PolicyRule) {
	slices.SortFunc(rs, func(a, b api.PolicyRule) int {
		return strings.Compare(a.Direction+"\x00"+a.Peer+"\x00"+a.Protocol+"\x00"+fmt.Sprintf("%08s", a.Ports),
			b.Direction+"\x00"+b.Peer+"\x00"+b.Protocol+"\x00"+fmt.Sprintf("%08s", b.Ports))
	})
}

// PinnedView reads what the pinned maps enforce for the pod endpoint ep (no agent): the
// isolation of its identity, its allow entries grouped by the slot that produced them,
// the policies' names from tern_policy_names and their counters. Peers are described by
// what the maps know: an ipBlock prefix, or the addresses tern_ipcache gives the identity.
func PinnedView(m *loader.PolicyMaps, ipcache *ebpf.Map, ep loader.EndpointValue) (api.PolicyView, error) {
	enforced := ep.Flags&loader.EndpointFlagPolicy != 0
	v := api.PolicyView{Address: loader.BEToAddr(ep.Addr).String(), Identity: ep.Identity, Enforced: &enforced,
		Policies: []api.PolicyOfPod{}}
	var iso loader.PolicyIsoValue
	if err := m.Isolation.Lookup(ep.Identity, &iso); err == nil {
		v.IsolatedIngress = iso.Flags&policy.IsolatedIngress != 0
		v.IsolatedEgress = iso.Flags&policy.IsolatedEgress != 0
		v.Audit = iso.Flags&policy.Audit != 0
	} else if !loader.IsNotExist(err) {
		return v, fmt.Errorf("read %s[%d]: %w", loader.PodMapTernPolicyIsolation, ep.Identity, err)
	}

	// Peer descriptions.
	peers := map[uint32]string{0: "any", uint32(policy.IdentityHost): "host"}
	var (
		ck loader.PolicyCIDRKey
		cv loader.PolicyCIDRValue
	)
	it := m.CIDRs.Iterate()
	for it.Next(&ck, &cv) {
		if cv.Identity != uint32(policy.IdentityHost) {
			peers[cv.Identity] = netip.PrefixFrom(loader.BEToAddr(ck.Addr), int(ck.Prefixlen)).String()
		}
	}
	if err := it.Err(); err != nil {
		return v, fmt.Errorf("read %s: %w", loader.PodMapTernPolicyCidrs, err)
	}
	addrs := map[uint32][]string{}
	if ipcache != nil {
		var (
			ik loader.IPCacheKey
			iv loader.IPCacheValue
		)
		it := ipcache.Iterate()
		for it.Next(&ik, &iv) {
			if iv.Identity != 0 && ik.Prefixlen == 32 {
				addrs[iv.Identity] = append(addrs[iv.Identity], loader.BEToAddr(ik.Addr).String())
			}
		}
		if err := it.Err(); err != nil {
			return v, fmt.Errorf("read %s: %w", loader.PodMapTernIpcache, err)
		}
	}
	describe := func(id uint32) string {
		if d, ok := peers[id]; ok {
			return d
		}
		if a := addrs[id]; len(a) > 0 {
			slices.Sort(a)
			return "pods " + strings.Join(a, ",")
		}
		return "identity " + strconv.Itoa(int(id))
	}

	bySlot := map[uint32]*api.PolicyOfPod{}
	get := func(slot uint32) *api.PolicyOfPod {
		if p, ok := bySlot[slot]; ok {
			return p
		}
		p := &api.PolicyOfPod{Slot: slot, Name: "slot " + strconv.Itoa(int(slot)), Rules: []api.PolicyRule{}}
		var n loader.PolicyName
		if slot != 0 {
			if err := m.Names.Lookup(slot, &n); err == nil {
				p.Name = n.String()
			}
		}
		bySlot[slot] = p
		return p
	}
	var (
		rk loader.PolicyKey
		rv loader.PolicyValue
	)
	rit := m.Rules.Iterate()
	for rit.Next(&rk, &rv) {
		k, isolator := DecodeRuleKey(rk)
		if uint32(k.Subject) != ep.Identity {
			continue
		}
		p := get(rv.Policy)
		if isolator {
			p.Isolates = append(p.Isolates, k.Dir.String())
			continue
		}
		r := RuleView(k)
		r.Peer = describe(uint32(k.Peer))
		p.Rules = append(p.Rules, r)
	}
	if err := rit.Err(); err != nil {
		return v, fmt.Errorf("read %s: %w", loader.PodMapTernPolicy, err)
	}
	for _, p := range bySlot {
		c, err := Counters(m.Stats, p.Slot)
		if err != nil {
			return v, err
		}
		p.Counters = c
		slices.Sort(p.Isolates)
		SortRules(p.Rules)
		v.Policies = append(v.Policies, *p)
	}
	slices.SortFunc(v.Policies, func(a, b api.PolicyOfPod) int { return strings.Compare(a.Name, b.Name) })
	return v, nil
}
