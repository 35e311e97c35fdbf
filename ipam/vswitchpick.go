package ipam

import (
	"context"
	"fmt"

	"github.com/tern-net/tern/ipam/aliyun"
)

// pickZoneVSwitch returns the vSwitch with the most free addresses among ids that is in the
// node's zone: an ENI attaches only to an instance of its own zone. fromPod says the IDs come
// from the pod's k8s.aliyun.com/pod-networks annotation, so that IDs of other zones are the
// user's mistake, named in the error, rather than eni_conf's exhaustion. Shared by the kinds
// that create an ENI per pod (exclusive ENIs, trunk members).
func pickZoneVSwitch(ctx context.Context, cloud aliyun.Cloud, zone string, ids []string, fromPod bool) (aliyun.VSwitch, error) {
	if len(ids) == 0 {
		return aliyun.VSwitch{}, fmt.Errorf("%w: eni_conf vswitches has no entry for zone %s (the node's zone)", aliyun.ErrBadVSwitch, zone)
	}
	vs, err := cloud.VSwitches(ctx, ids)
	if err != nil {
		return aliyun.VSwitch{}, fmt.Errorf("describe vSwitches %v: %w", ids, err)
	}
	var best aliyun.VSwitch
	var otherZone []string
	for _, v := range vs {
		if v.ZoneID != zone {
			otherZone = append(otherZone, v.ID+" ("+v.ZoneID+")")
			continue
		}
		if v.Available > best.Available {
			best = v
		}
	}
	if best.ID == "" {
		if len(otherZone) > 0 && fromPod {
			return best, fmt.Errorf("%w: the pod's vSwitches %v are not in the node's zone %s: an ENI attaches only to an instance of its own zone", aliyun.ErrBadVSwitch, otherZone, zone)
		}
		return best, &VSwitchExhaustedError{Zone: zone, VSwitchIDs: ids}
	}
	return best, nil
}
