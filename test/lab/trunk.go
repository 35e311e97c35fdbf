//go:build linux

package lab

import (
	"context"
	"errors"
	"fmt"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/trunk"
	"github.com/tern-net/tern/test/ecsemu"
)

// checkTrunkMatchesAgents is CheckCloudMatchesAgents for ENI trunking: each trunk ENI is
// InUse on its node's instance; each member ENI is a Member of its node's trunk, InUse, and
// held by exactly one member pod of that node's agent, with the member's primary address and
// VLAN id; every member pod's member is in the cloud. A member no pod holds is a leak.
func (l *Lab) checkTrunkMatchesAgents(ctx context.Context, s ecsemu.State) error {
	var errs []error
	byNode := map[string]*Node{}
	for _, n := range l.nodes {
		byNode[n.Name] = n
	}
	members := map[string]ecsemu.ENIState{}
	for _, e := range s.ENIs {
		switch e.Tags[trunk.TagRole] {
		case trunk.RoleTrunk:
			n, ok := byNode[e.Tags[trunk.TagTrunkNode]]
			if !ok || e.Status != aliyun.StatusInUse || e.InstanceID != n.InstanceID || e.Type != aliyun.TypeTrunk {
				errs = append(errs, fmt.Errorf("trunk ENI %s (node tag %q) is a %s, %s on %q", e.ID, e.Tags[trunk.TagTrunkNode], e.Type, e.Status, e.InstanceID))
			}
		case trunk.RoleMember:
			members[e.ID] = e
		}
	}
	for _, n := range l.nodes {
		st, err := n.Client().State(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("state of %s's agent: %w", n.Name, err))
			continue
		}
		for k, a := range st.Allocations {
			if a.Kind != api.KindMember {
				continue
			}
			e, ok := members[a.MemberENI]
			if !ok || e.Tags[trunk.TagTrunkNode] != n.Name || e.Status != aliyun.StatusInUse || e.Type != aliyun.TypeMember ||
				e.Trunk != a.ENI.ID || e.PrimaryIP != a.IP || e.DeviceIndex != a.VLAN {
				errs = append(errs, fmt.Errorf("%s: pod %s holds member ENI %s (%s, VLAN %d on trunk %s), the cloud has %+v", n.Name, k, a.MemberENI, a.IP, a.VLAN, a.ENI.ID, e))
			}
			delete(members, a.MemberENI)
		}
	}
	for id, e := range members {
		errs = append(errs, fmt.Errorf("cloud member ENI %s (pod tag %q, node %q, %s) is held by no pod: leaked", id, e.Tags[trunk.TagPod], e.Tags[trunk.TagTrunkNode], e.Status))
	}
	return errors.Join(errs...)
}
