package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// TrunkPod is a pod on a member ENI to wire: its veth, the node's trunk ENI (which carries
// its traffic) and its member's VLAN id.
type TrunkPod struct {
	Link  PodLink
	Trunk ENI
	VLAN  int
}

// SetupPod wires a member-ENI pod exactly like a pod on an ENI's secondary address — the
// trunk ENI's link configured with its own table (EnsureENI), the pod's veth (SetupPodLink)
// and its two policy-routing rules (SetupPodRules) — and then tags it: the trunk programs go
// first on the trunk's link (once) and the pod's VLAN into their maps. Run it on a thread in
// the node namespace.
func (t *Trunk) SetupPod(p TrunkPod, timeout time.Duration) (PodLinkResult, ENILink, error) {
	el, err := EnsureENI(p.Trunk, timeout)
	if err != nil {
		return PodLinkResult{}, el, fmt.Errorf("trunk pod %s: trunk ENI link: %w", p.Link.PodIP, err)
	}
	if err := t.Attach(el.Index); err != nil {
		return PodLinkResult{}, el, fmt.Errorf("trunk pod %s: %w", p.Link.PodIP, err)
	}
	res, err := SetupPodLink(p.Link)
	if err != nil {
		return res, el, err
	}
	if err := SetupPodRules(p.Link.PodIP, el.Table); err != nil {
		return res, el, err
	}
	if err := t.AddPod(p.Link.PodIP, el.Index, p.VLAN); err != nil {
		return res, el, err
	}
	return res, el, nil
}

// TeardownPod undoes SetupPod for one pod; what is already gone is not an error.
func (t *Trunk) TeardownPod(hostIfName string, podIP netip.Addr, trunkIfindex, vlan int) error {
	return errors.Join(t.DelPod(podIP, trunkIfindex, vlan), DeletePodRules(podIP), DeletePodLink(hostIfName))
}
