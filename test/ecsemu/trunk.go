package ecsemu

import (
	"net/http"
	"time"

	"go.uber.org/zap"
)

// ENI trunking, as the ECS API exposes it (and as Terway drives it,
// AliyunContainerService/terway pkg/aliyun/client):
//
//   - CreateNetworkInterface with InstanceType=Trunk makes a trunk ENI; it is attached to the
//     instance like any secondary ENI (it takes a device index and counts against EniQuantity),
//     and only an instance type with EniTrunkSupported takes one, one per instance.
//   - A member ENI is an ordinary ENI (InstanceType=Secondary, the default) attached with
//     AttachNetworkInterface(InstanceId, NetworkInterfaceId, TrunkNetworkInstanceId). It gets
//     no device: the cloud gives it a VLAN id on the trunk, reported as Attachment.DeviceIndex
//     (Terway reads its pods' VLAN id from there), and its Type reads "Member" while attached.
//     Attachment.TrunkNetworkInterfaceId names the trunk; the trunk's Attachment lists
//     MemberNetworkInterfaceIds.
//   - An instance takes EniTotalQuantity − EniQuantity member ENIs (Terway's
//     MemberAdapterLimit); none when the type does not support trunking.
//   - DetachNetworkInterface of a member names the trunk again (TrunkNetworkInstanceId). A
//     trunk with members cannot be detached.
//
// The documentation names no error codes for the trunk cases; the emulator answers with the
// codes of the nearest untrunked case (EniPerInstanceLimitExceeded for the member quota,
// InvalidOperation.InvalidEniType / InvalidEniState / InvalidParameter otherwise) and says
// what is wrong in the message.

// TypeMember is the Type a listing shows for an ENI attached to a trunk ENI.
const TypeMember = "Member"

// maxVLAN is the highest 802.1Q VLAN id (4095 is reserved).
const maxVLAN = 4094

// createType maps CreateNetworkInterface's InstanceType to the ENI's type.
func createType(s string) (string, *APIError) {
	switch s {
	case "", TypeSecondary:
		return TypeSecondary, nil
	case TypeTrunk:
		return TypeTrunk, nil
	}
	return "", apiErr(http.StatusBadRequest, CodeInvalidParameter, "InstanceType %q is not valid: use %s or %s.", s, TypeSecondary, TypeTrunk)
}

// currentView is the true attachment state of n, as a listing without lag shows it.
func (n *eni) currentView() eniView {
	return eniView{status: n.status, instanceID: n.instanceID, deviceIndex: n.deviceIndex, trunk: n.trunk, attachedAt: n.attachedAt}
}

// typeIn is n's Type as a listing showing view v reports it.
func (n *eni) typeIn(v eniView) string {
	if v.trunk != "" {
		return TypeMember
	}
	return n.typ
}

// MemberQuota is how many member ENIs an instance of type t can attach to its trunk ENI.
func MemberQuota(t InstanceTypeConfig) int {
	if !t.EniTrunkSupported {
		return 0
	}
	return max(t.EniTotalQuantity-t.EniQuantity, 0)
}

// trunkAttachmentLocked adds the trunk fields of a listing's Attachment: a member's trunk, a
// trunk's members (those a listing shows attached to it).
func (e *Emulator) trunkAttachmentLocked(n *eni, v eniView, w *wireENI) {
	if v.trunk != "" {
		w.Attachment.TrunkNetworkInterfaceID = v.trunk
	}
	if n.typ != TypeTrunk {
		return
	}
	ids := []string{}
	for _, id := range e.eniIDs {
		if o := e.enis[id]; e.viewLocked(o).trunk == n.id {
			ids = append(ids, id)
		}
	}
	w.Attachment.MemberNetworkInterfaceIDs = &wireMemberENIIDs{MemberNetworkInterfaceID: ids}
}

type wireMemberENIIDs struct {
	MemberNetworkInterfaceID []string `json:"MemberNetworkInterfaceId"`
}

// checkTrunkAttachLocked refuses a trunk ENI on an instance type without trunking, and a
// second trunk ENI on one instance.
func (e *Emulator) checkTrunkAttachLocked(in *instance, n *eni) *APIError {
	if n.typ != TypeTrunk {
		return nil
	}
	if !in.typ.EniTrunkSupported {
		return apiErr(http.StatusForbidden, CodeInvalidEniType, "Instance type %s of instance %s does not support trunk ENIs (EniTrunkSupported is false); ENI %s is a trunk ENI.", in.cfg.Type, in.cfg.ID, n.id)
	}
	for _, id := range e.eniIDs {
		if o := e.enis[id]; o != n && o.typ == TypeTrunk && o.instanceID == in.cfg.ID {
			return apiErr(http.StatusForbidden, CodeInvalidEniType, "Instance %s already has trunk ENI %s; an instance takes one trunk ENI.", in.cfg.ID, o.id)
		}
	}
	return nil
}

// attachMemberLocked attaches n to the trunk ENI trunkID of instance in, with the lowest free
// VLAN id of that trunk.
func (e *Emulator) attachMemberLocked(in *instance, n *eni, trunkID string) (any, *APIError) {
	t, ok := e.enis[trunkID]
	if !ok {
		return nil, apiErr(http.StatusNotFound, CodeEniNotFound, "The specified TrunkNetworkInstanceId %q does not exist.", trunkID)
	}
	if t.typ != TypeTrunk {
		return nil, apiErr(http.StatusForbidden, CodeInvalidEniType, "TrunkNetworkInstanceId %s is a %s ENI, not a trunk ENI.", t.id, t.typ)
	}
	if t.status != StatusInUse || t.instanceID != in.cfg.ID {
		return nil, apiErr(http.StatusForbidden, CodeInvalidEniState, "Trunk ENI %s is %s (instance %q); it must be InUse on instance %s to take member ENIs.", t.id, t.status, t.instanceID, in.cfg.ID)
	}
	if n.typ != TypeSecondary {
		return nil, apiErr(http.StatusForbidden, CodeInvalidEniType, "ENI %s is a %s ENI; only a secondary ENI can become a member of a trunk.", n.id, n.typ)
	}
	if n.status != StatusAvailable {
		return nil, apiErr(http.StatusForbidden, CodeInvalidEniState, "ENI %s is %s; it must be Available to attach.", n.id, n.status)
	}
	if n.vswitch.cfg.Zone != in.cfg.Zone {
		return nil, apiErr(http.StatusForbidden, CodeEniZoneMismatch, "ENI %s is in zone %s but instance %s is in %s.", n.id, n.vswitch.cfg.Zone, in.cfg.ID, in.cfg.Zone)
	}
	if len(n.ips) > in.typ.EniPrivateIpAddressQuantity {
		return nil, apiErr(http.StatusForbidden, CodeIpv4CountExceeded,
			"ENI %s has %d private IP addresses; instance type %s allows %d per ENI.", n.id, len(n.ips), in.cfg.Type, in.typ.EniPrivateIpAddressQuantity)
	}
	used := map[int]bool{}
	members := 0
	for _, id := range e.eniIDs {
		o := e.enis[id]
		if o.trunk == "" || o.instanceID != in.cfg.ID {
			continue
		}
		members++ // a Detaching member still holds its quota slot and its VLAN
		if o.trunk == t.id {
			used[o.deviceIndex] = true
		}
	}
	if quota := MemberQuota(in.typ); members >= quota {
		return nil, apiErr(http.StatusForbidden, CodeEniPerInstanceLimit,
			"Instance %s (%s) already has %d member ENIs, its limit (EniTotalQuantity %d − EniQuantity %d, trunking supported: %t).",
			in.cfg.ID, in.cfg.Type, members, in.typ.EniTotalQuantity, in.typ.EniQuantity, in.typ.EniTrunkSupported)
	}
	vlan := 1
	for used[vlan] {
		vlan++
	}
	if vlan > maxVLAN {
		return nil, apiErr(http.StatusForbidden, CodeEniPerInstanceLimit, "Trunk ENI %s has no free VLAN id.", t.id)
	}
	e.transitionLocked(n, func() {
		n.status = StatusAttaching
		n.instanceID = in.cfg.ID
		n.deviceIndex = vlan
		n.trunk = t.id
	})
	n.gen++
	e.scheduleLocked(n, time.Duration(e.delays.MemberAttach), e.finishMemberAttachLocked)
	return map[string]any{}, nil
}

func (e *Emulator) finishMemberAttachLocked(n *eni) {
	if err := e.sdn.AttachENI(e.infoLocked(n)); err != nil {
		e.log.Error("SDN member attach failed; ENI goes back to Available", zap.String("eni", n.id),
			zap.String("trunk", n.trunk), zap.Error(err))
		e.transitionLocked(n, func() {
			n.status = StatusAvailable
			n.instanceID = ""
			n.deviceIndex = 0
			n.trunk = ""
		})
		return
	}
	n.plugged = true
	e.transitionLocked(n, func() {
		n.status = StatusInUse
		n.attachedAt = e.now()
	})
	e.log.Info("member ENI attached", zap.String("eni", n.id), zap.String("trunk", n.trunk),
		zap.String("instance", n.instanceID), zap.Int("vlan", n.deviceIndex))
}

// checkTrunkDetachLocked checks DetachNetworkInterface's TrunkNetworkInstanceId against n: a
// member must name its trunk, an ENI that is no member must not name one, and a trunk ENI
// with members cannot leave.
func (e *Emulator) checkTrunkDetachLocked(n *eni, trunkParam string) *APIError {
	switch {
	case n.trunk != "" && trunkParam != n.trunk:
		return apiErr(http.StatusBadRequest, CodeInvalidParameter, "ENI %s is a member of trunk ENI %s; detach it with TrunkNetworkInstanceId=%s (got %q).", n.id, n.trunk, n.trunk, trunkParam)
	case n.trunk == "" && trunkParam != "":
		return apiErr(http.StatusBadRequest, CodeInvalidParameter, "ENI %s is not a member of trunk ENI %s.", n.id, trunkParam)
	case n.typ == TypeTrunk:
		for _, id := range e.eniIDs {
			if o := e.enis[id]; o.trunk == n.id {
				return apiErr(http.StatusForbidden, CodeInvalidEniState, "Trunk ENI %s still has member ENI %s (and maybe more); detach its members first.", n.id, o.id)
			}
		}
	}
	return nil
}

// detachDelayLocked is how long n stays Detaching.
func (e *Emulator) detachDelayLocked(n *eni) time.Duration {
	if n.trunk != "" {
		return time.Duration(e.delays.MemberAttach)
	}
	return time.Duration(e.delays.Detach)
}

// SetTrunking makes instance type id support trunking with EniTotalQuantity total (so
// total − EniQuantity member ENIs). The g7 types of TestConfig carry no trunk numbers: the
// real per-type values could not be checked from this machine, so tests pick their own.
func (c *Config) SetTrunking(id string, total int) bool {
	for i := range c.InstanceTypes {
		if c.InstanceTypes[i].ID == id {
			c.InstanceTypes[i].EniTrunkSupported = true
			c.InstanceTypes[i].EniTotalQuantity = total
			return true
		}
	}
	return false
}
