package ecsemu

import (
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
