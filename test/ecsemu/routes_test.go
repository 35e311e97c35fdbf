package ecsemu

import (
	"fmt"
	"testing"
	"time"

	"github.com/aliyun/alibaba-cloud-sdk-go/services/vpc"
)

// TestRouteTablesThroughTheSDK: the route actions are signature-checked like the others, and
// DescribeRouteTables / DescribeRouteEntryList show System entries for the vSwitches beside a
// custom entry whose status moves from Pending to Available.
func TestRouteTablesThroughTheSDK(t *testing.T) {
	e, addr := NewTestServer(t, TestConfig())
	e.SetDelays(TransitionDelays{Route: Duration(time.Hour)})
	_, vc := NewTestClients(t, addr)
	_, bad, err := NewClients(TestRegion, addr, TestAccessKeyID, "wrong-secret")
	must(t, err)
	req := vpc.CreateCreateRouteEntryRequest()
	req.RouteTableId, req.DestinationCidrBlock, req.NextHopId = e.RouteTableID(), "10.200.0.0/24", "i-test-0001"
	_, err = bad.CreateRouteEntry(req)
	wantCode(t, err, CodeSignatureDoesNotMatch)
	if n := len(e.Snapshot().Routes); n != 0 {
		t.Fatalf("a badly signed create added %d entries", n)
	}

	req = vpc.CreateCreateRouteEntryRequest()
	req.RouteTableId, req.DestinationCidrBlock, req.NextHopId = e.RouteTableID(), "10.200.0.0/24", "i-test-0001"
	resp, err := vc.CreateRouteEntry(req)
	must(t, err)
	status := func() (custom string, system int) {
		t.Helper()
		r := vpc.CreateDescribeRouteTablesRequest()
		r.RouteTableId = e.RouteTableID()
		out, err := vc.DescribeRouteTables(r)
		must(t, err)
		if len(out.RouteTables.RouteTable) != 1 {
			t.Fatalf("DescribeRouteTables returned %d tables, want 1", len(out.RouteTables.RouteTable))
		}
		for _, re := range out.RouteTables.RouteTable[0].RouteEntrys.RouteEntry {
			switch re.Type {
			case RouteTypeSystem:
				system++
			case RouteTypeCustom:
				if re.RouteEntryId != resp.RouteEntryId || re.DestinationCidrBlock != "10.200.0.0/24" || re.InstanceId != "i-test-0001" {
					t.Fatalf("custom entry %+v", re)
				}
				custom = re.Status
			}
		}
		return custom, system
	}
	if st, sys := status(); st != RouteStatusPending || sys != 2 {
		t.Fatalf("after create: custom %q, %d System entries; want Pending and one per vSwitch (2)", st, sys)
	}
	e.FinishTransitions()
	if st, _ := status(); st != RouteStatusAvailable {
		t.Fatalf("after the transition: %q, want Available", st)
	}
	lr := vpc.CreateDescribeRouteEntryListRequest()
	lr.RouteTableId, lr.RouteEntryType = e.RouteTableID(), RouteTypeCustom
	list, err := vc.DescribeRouteEntryList(lr)
	must(t, err)
	if len(list.RouteEntrys.RouteEntry) != 1 || list.RouteEntrys.RouteEntry[0].NextHops.NextHop[0].NextHopId != "i-test-0001" {
		t.Fatalf("DescribeRouteEntryList custom entries %+v", list.RouteEntrys.RouteEntry)
	}
	unknown := vpc.CreateDescribeRouteEntryListRequest()
	unknown.RouteTableId = "vtb-nope"
	_, err = vc.DescribeRouteEntryList(unknown)
	wantCode(t, err, CodeRouteTableNotFound)
}

// TestRouteListingLags: with ListingLag.Routes, DescribeRouteEntryList and DescribeRouteTables
// show the route table as it was that long ago — a new entry missing, a status change late, a
// deleted entry still listed with its old status — while CreateRouteEntry acts on the true
// table (InvalidCIDRBlock.Duplicate for the entry the listing does not show yet).
func TestRouteListingLags(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	cfg := TestConfig()
	cfg.ListingLag = ListingLag{Routes: Duration(time.Second)}
	e, addr := NewTestServer(t, cfg, WithClock(clock.Now))
	e.SetDelays(TransitionDelays{Route: Duration(time.Hour), RouteDelete: Duration(time.Hour)})
	_, vc := NewTestClients(t, addr)
	listed := func() map[string]string {
		t.Helper()
		lr := vpc.CreateDescribeRouteEntryListRequest()
		lr.RouteTableId, lr.RouteEntryType = e.RouteTableID(), RouteTypeCustom
		list, err := vc.DescribeRouteEntryList(lr)
		must(t, err)
		out := map[string]string{}
		for _, r := range list.RouteEntrys.RouteEntry {
			out[r.DestinationCidrBlock] = r.Status
		}
		tr := vpc.CreateDescribeRouteTablesRequest()
		tr.RouteTableId = e.RouteTableID()
		tables, err := vc.DescribeRouteTables(tr)
		must(t, err)
		inTable := map[string]string{}
		for _, r := range tables.RouteTables.RouteTable[0].RouteEntrys.RouteEntry {
			if r.Type == RouteTypeCustom {
				inTable[r.DestinationCidrBlock] = r.Status
			}
		}
		if len(inTable) != len(out) || fmt.Sprint(inTable) != fmt.Sprint(out) {
			t.Fatalf("DescribeRouteTables shows %v, DescribeRouteEntryList %v: the two listings disagree", inTable, out)
		}
		return out
	}
	create := func(dst string) (string, error) {
		req := vpc.CreateCreateRouteEntryRequest()
		req.RouteTableId, req.DestinationCidrBlock, req.NextHopId = e.RouteTableID(), dst, "i-test-0001"
		resp, err := vc.CreateRouteEntry(req)
		if err != nil {
			return "", err
		}
		return resp.RouteEntryId, nil
	}
	const dst = "10.200.0.0/24"
	id, err := create(dst)
	must(t, err)
	if got := listed(); len(got) != 0 {
		t.Fatalf("right after the create the listing shows %v; want nothing yet", got)
	}
	_, err = create(dst)
	wantCode(t, err, CodeRouteCIDRDuplicate) // the true table has it
	clock.Advance(time.Second)
	if got := listed(); got[dst] != RouteStatusPending {
		t.Fatalf("a second later: %v, want %s Pending", got, dst)
	}
	e.FinishTransitions()
	if got := listed(); got[dst] != RouteStatusPending {
		t.Fatalf("right after it turned Available: %v, want it still listed Pending", got)
	}
	clock.Advance(time.Second)
	if got := listed(); got[dst] != RouteStatusAvailable {
		t.Fatalf("a second after it turned Available: %v", got)
	}
	// Deleted (at once, as from the console): still listed, Available, for the lag.
	must(t, e.DeleteRouteEntryNow(id))
	if n := len(e.Snapshot().Routes); n != 0 {
		t.Fatalf("the true table holds %d entries after the delete", n)
	}
	if got := listed(); got[dst] != RouteStatusAvailable {
		t.Fatalf("right after the delete: %v, want %s still listed Available", got, dst)
	}
	if l := e.ListedRoutes(); len(l) != 1 || l[0].ID != id {
		t.Fatalf("ListedRoutes = %+v, want the deleted entry %s", l, id)
	}
	// The true table is free again: a new create for the same CIDR succeeds at once.
	id2, err := create(dst)
	must(t, err)
	clock.Advance(time.Second)
	l := e.ListedRoutes()
	if len(l) != 1 || l[0].ID != id2 || l[0].Status != RouteStatusPending {
		t.Fatalf("a second after the delete and the new create: %+v, want only %s Pending", l, id2)
	}
}
