package aliyun

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/aliyun/alibaba-cloud-sdk-go/services/vpc"
)

// RouteCloud is the VPC route table API the route mode needs: one custom entry per node
// that sends the node's pod CIDR to its instance. Every method is safe for concurrent use.
type RouteCloud interface {
	// SystemRouteTable returns the ID of the VPC's system route table.
	SystemRouteTable(ctx context.Context, vpcID string) (string, error)
	// RouteEntries lists the custom entries of a table matching every non-empty filter field.
	RouteEntries(ctx context.Context, tableID string, f RouteFilter) ([]RouteEntry, error)
	// CreateRouteEntry adds an entry (it starts Pending) and returns its ID. The token makes a
	// retried create return the same entry.
	CreateRouteEntry(ctx context.Context, req CreateRouteRequest) (string, error)
	// DeleteRouteEntry deletes an entry by ID. Deleting a missing entry succeeds.
	DeleteRouteEntry(ctx context.Context, tableID, entryID string) error
	// WaitRouteEntry polls until the entry for dst is Available (w.Present) or gone, and
	// returns the entry seen last.
	WaitRouteEntry(ctx context.Context, tableID string, dst netip.Prefix, w RouteWait) (RouteEntry, error)
}

var _ RouteCloud = (*Client)(nil)

// Route entry statuses and types as the VPC API reports them.
const (
	RouteStatusPending   = "Pending"
	RouteStatusAvailable = "Available"
	RouteTypeCustom      = "Custom"
	NextHopInstance      = "Instance"
)

// RouteEntry is one custom entry of a route table.
type RouteEntry struct {
	ID          string
	TableID     string
	Destination netip.Prefix
	NextHopType string
	NextHopID   string
	Name        string
	Description string
	Status      string
}

// RouteWait says what WaitRouteEntry waits for. The listing lags behind the calls that
// change the table: it may not show a new entry yet, and may still show a deleted one.
type RouteWait struct {
	// Present waits for the entry to be Available; false waits for it to be gone.
	Present bool
	// ID, when set, is the entry a create just returned: a listed entry with another ID (an
	// older one for the destination, deleted, that the listing still shows) counts as not
	// listed.
	ID string
	// Unlisted is, with Present, how long an entry the listing does not show is waited for
	// (from the first poll) before it counts as vanished.
	Unlisted time.Duration
}

// RouteFilter selects route entries; empty fields do not filter.
type RouteFilter struct {
	Destination netip.Prefix
	Name        string
	NextHopID   string
}

// CreateRouteRequest describes a custom entry whose next hop is an ECS instance.
type CreateRouteRequest struct {
	TableID     string
	Destination netip.Prefix
	InstanceID  string
	Name        string
	Description string
	Token       string // ClientToken; required
}

// SystemRouteTable implements RouteCloud.
func (c *Client) SystemRouteTable(ctx context.Context, vpcID string) (string, error) {
	var resp *vpc.DescribeRouteTableListResponse
	err := c.call(ctx, actDescribeRouteTables, func() error {
		req := vpc.CreateDescribeRouteTableListRequest()
		req.VpcId = vpcID
		req.RouteTableType = "System"
		r, err := c.vpc.DescribeRouteTableList(req)
		resp = r
		return err
	})
	if err != nil {
		return "", err
	}
	for _, t := range resp.RouterTableList.RouterTableListType {
		if t.VpcId == vpcID && t.RouteTableType == "System" {
			return t.RouteTableId, nil
		}
	}
	return "", &APIError{Action: actDescribeRouteTables, Code: "InvalidRouteTableId.NotFound", RequestID: resp.RequestId,
		Message: fmt.Sprintf("VPC %s has no system route table in region %s; set routeTableID in the agent config", vpcID, c.opts.RegionID),
		cause:   ErrNotFound}
}

// RouteEntries implements RouteCloud.
func (c *Client) RouteEntries(ctx context.Context, tableID string, f RouteFilter) ([]RouteEntry, error) {
	var out []RouteEntry
	token := ""
	for {
		var resp *vpc.DescribeRouteEntryListResponse
		err := c.call(ctx, actDescribeRouteEntries, func() error {
			req := vpc.CreateDescribeRouteEntryListRequest()
			req.RouteTableId = tableID
			req.RouteEntryType = RouteTypeCustom
			req.MaxResult = requestsInt(100)
			req.NextToken = token
			if f.Destination.IsValid() {
				req.DestinationCidrBlock = f.Destination.String()
			}
			req.RouteEntryName = f.Name
			req.NextHopId = f.NextHopID
			r, err := c.vpc.DescribeRouteEntryList(req)
			resp = r
			return err
		})
		if err != nil {
			return nil, err
		}
		for _, r := range resp.RouteEntrys.RouteEntry {
			e := RouteEntry{ID: r.RouteEntryId, TableID: r.RouteTableId, NextHopType: r.NextHopType, NextHopID: r.InstanceId,
				Name: r.RouteEntryName, Description: r.Description, Status: r.Status}
			if len(r.NextHops.NextHop) > 0 {
				e.NextHopType, e.NextHopID = r.NextHops.NextHop[0].NextHopType, r.NextHops.NextHop[0].NextHopId
			}
			p, err := netip.ParsePrefix(r.DestinationCidrBlock)
			if err != nil {
				return nil, fmt.Errorf("DescribeRouteEntryList of %s: entry %s has a bad destination %q [RequestId %s]", tableID, r.RouteEntryId, r.DestinationCidrBlock, resp.RequestId)
			}
			e.Destination = p
			// Filter again: ownership decisions depend on it.
			if (f.Destination.IsValid() && e.Destination != f.Destination) || (f.Name != "" && e.Name != f.Name) ||
				(f.NextHopID != "" && e.NextHopID != f.NextHopID) || r.Type != RouteTypeCustom {
				continue
			}
			out = append(out, e)
		}
		if resp.NextToken == "" {
			return out, nil
		}
		token = resp.NextToken
	}
}

// CreateRouteEntry implements RouteCloud.
func (c *Client) CreateRouteEntry(ctx context.Context, r CreateRouteRequest) (string, error) {
	if r.Token == "" {
		return "", fmt.Errorf("CreateRouteEntry for %s: empty token; generate one per logical create and record it first", r.Destination)
	}
	if !r.Destination.IsValid() || r.InstanceID == "" || r.TableID == "" {
		return "", fmt.Errorf("CreateRouteEntry: table %q, destination %s and instance %q are all required", r.TableID, r.Destination, r.InstanceID)
	}
	var resp *vpc.CreateRouteEntryResponse
	err := c.call(ctx, actCreateRoute, func() error {
		req := vpc.CreateCreateRouteEntryRequest()
		req.RouteTableId = r.TableID
		req.DestinationCidrBlock = r.Destination.String()
		req.NextHopType = NextHopInstance
		req.NextHopId = r.InstanceID
		req.RouteEntryName = r.Name
		req.Description = r.Description
		req.ClientToken = r.Token
		out, err := c.vpc.CreateRouteEntry(req)
		resp = out
		return err
	})
	if err != nil {
		return "", err
	}
	return resp.RouteEntryId, nil
}

// DeleteRouteEntry implements RouteCloud.
func (c *Client) DeleteRouteEntry(ctx context.Context, tableID, entryID string) error {
	err := c.call(ctx, actDeleteRoute, func() error {
		req := vpc.CreateDeleteRouteEntryRequest()
		req.RouteTableId = tableID
		req.RouteEntryId = entryID
		_, err := c.vpc.DeleteRouteEntry(req)
		return err
	})
	if isNotFound(err) {
		return nil
	}
	return err
}

// WaitRouteEntry implements RouteCloud.
func (c *Client) WaitRouteEntry(ctx context.Context, tableID string, dst netip.Prefix, w RouteWait) (RouteEntry, error) {
	start := time.Now()
	deadline := start.Add(c.opts.WaitTimeout)
	for {
		es, err := c.RouteEntries(ctx, tableID, RouteFilter{Destination: dst})
		if err != nil {
			return RouteEntry{}, fmt.Errorf("waiting for the route entry of %s in %s: %w", dst, tableID, err)
		}
		if w.ID != "" {
			es = slices.DeleteFunc(es, func(e RouteEntry) bool { return e.ID != w.ID })
		}
		var cur RouteEntry
		if len(es) > 0 {
			cur = es[0]
		}
		switch {
		case w.Present && cur.Status == RouteStatusAvailable:
			return cur, nil
		case !w.Present && len(es) == 0:
			return RouteEntry{}, nil
		case w.Present && len(es) == 0 && time.Since(start) >= w.Unlisted:
			return RouteEntry{}, fmt.Errorf("route entry of %s in %s is not listed after %s (deleted, or the listing lags more than that): %w",
				dst, tableID, time.Since(start).Round(time.Millisecond), ErrNotFound)
		}
		if time.Now().After(deadline) {
			return cur, fmt.Errorf("route entry of %s in %s is still %q after %s: %w", dst, tableID, cur.Status, c.opts.WaitTimeout, ErrTimeout)
		}
		t := time.NewTimer(c.opts.PollInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return cur, ctx.Err()
		case <-t.C:
		}
	}
}
