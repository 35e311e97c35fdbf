package aliyun

import (
	"context"
	"fmt"

	"github.com/aliyun/alibaba-cloud-sdk-go/services/ecs"
)

// ENI trunking. A trunk ENI is created with CreateENIRequest.Trunk and attached with
// AttachENI like any ENI; a member ENI is a plain ENI (CreateENI) attached to the trunk with
// AttachMemberENI, which waits until the cloud has given it a VLAN id (ENI.VLAN, the listing's
// Attachment.DeviceIndex, as Terway reads it). Members leave with DetachMemberENI and go with
// DeleteENI. Every call goes through the same rate limiter, retry and backoff as the rest of
// the client; creates carry the caller's ClientToken.

// ENI types of trunking, as the API reports them.
const (
	TypeTrunk  = "Trunk"
	TypeMember = "Member"
)

// MaxVLAN is the highest VLAN id the cloud can hand out (802.1Q reserves 0 and 4095).
const MaxVLAN = 4094

// TrunkCloud is the part of the cloud that trunking needs beyond Cloud.
type TrunkCloud interface {
	Cloud
	// AttachMemberENI attaches an Available secondary ENI to the instance's trunk ENI and waits
	// until it is InUse with a VLAN id.
	AttachMemberENI(ctx context.Context, eniID, instanceID, trunkID string) (ENI, error)
	// DetachMemberENI detaches a member ENI from its trunk and waits until it is Available.
	// Detaching a member that is already Available, or gone, succeeds.
	DetachMemberENI(ctx context.Context, eniID, instanceID, trunkID string) error
}

var _ TrunkCloud = (*Client)(nil)

// MemberQuota is how many member ENIs an instance type takes: EniTotalQuantity − EniQuantity
// when it supports trunking (Terway's MemberAdapterLimit), else none.
func MemberQuota(l Limits) int {
	if !l.TrunkSupport {
		return 0
	}
	return max(l.TotalENIs-l.ENIs, 0)
}

// AttachMemberENI implements TrunkCloud.
func (c *Client) AttachMemberENI(ctx context.Context, eniID, instanceID, trunkID string) (ENI, error) {
	if trunkID == "" {
		return ENI{}, fmt.Errorf("AttachMemberENI %s: empty trunk ENI ID; the node's trunk ENI must be attached first", eniID)
	}
	err := c.call(ctx, actAttachENI, func() error {
		req := ecs.CreateAttachNetworkInterfaceRequest()
		req.NetworkInterfaceId = eniID
		req.InstanceId = instanceID
		req.TrunkNetworkInstanceId = trunkID
		_, err := c.ecs.AttachNetworkInterface(req)
		return err
	})
	if err != nil && !isInvalidState(err) {
		return ENI{}, err
	}
	// A wrong-state reply may mean an earlier attempt already attached it: the wait decides.
	return c.waitFor(ctx, eniID, "a member of trunk "+trunkID, func(e *ENI) (bool, error) {
		switch {
		case e == nil:
			return false, fmt.Errorf("ENI %s vanished while joining trunk %s: %w", eniID, trunkID, ErrNotFound)
		case e.Status == StatusInUse && e.TrunkID == trunkID && e.InstanceID == instanceID:
			if e.VLAN < 1 || e.VLAN > MaxVLAN {
				return false, fmt.Errorf("member ENI %s on trunk %s reports VLAN id %d, outside 1..%d", eniID, trunkID, e.VLAN, MaxVLAN)
			}
			return true, nil
		case e.Status == StatusAttaching, e.Status == StatusAvailable:
			return false, nil // the listing may lag behind the call
		default:
			if err != nil {
				return false, err
			}
			return false, fmt.Errorf("ENI %s is %s on instance %q trunk %q, not joining trunk %s: %w",
				eniID, e.Status, e.InstanceID, e.TrunkID, trunkID, ErrInvalidState)
		}
	})
}

// DetachMemberENI implements TrunkCloud.
func (c *Client) DetachMemberENI(ctx context.Context, eniID, instanceID, trunkID string) error {
	err := c.call(ctx, actDetachENI, func() error {
		req := ecs.CreateDetachNetworkInterfaceRequest()
		req.NetworkInterfaceId = eniID
		req.InstanceId = instanceID
		req.TrunkNetworkInstanceId = trunkID
		_, err := c.ecs.DetachNetworkInterface(req)
		return err
	})
	if isNotFound(err) {
		return nil
	}
	if err != nil && !isInvalidState(err) {
		return err
	}
	_, err = c.waitFor(ctx, eniID, "detached from trunk "+trunkID, func(e *ENI) (bool, error) {
		switch {
		case e == nil, e.Status == StatusAvailable:
			return true, nil
		case e.Status == StatusDetaching:
			return false, nil
		case e.Status == StatusInUse && e.TrunkID == trunkID:
			return false, nil // the detach may not be visible yet
		default:
			if err != nil {
				return false, err
			}
			return false, fmt.Errorf("ENI %s is %s (trunk %q) while detaching from trunk %s: %w", eniID, e.Status, e.TrunkID, trunkID, ErrInvalidState)
		}
	})
	return err
}
