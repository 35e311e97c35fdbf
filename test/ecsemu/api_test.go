package ecsemu

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	sdkerrors "github.com/aliyun/alibaba-cloud-sdk-go/sdk/errors"
	"github.com/aliyun/alibaba-cloud-sdk-go/sdk/requests"
	"github.com/aliyun/alibaba-cloud-sdk-go/services/ecs"
	"github.com/aliyun/alibaba-cloud-sdk-go/services/vpc"
)

// wantCode asserts that err is an SDK ServerError with the given code.
func wantCode(t *testing.T, err error, code string) *sdkerrors.ServerError {
	t.Helper()
	if err == nil {
		t.Fatalf("call succeeded, want error %s", code)
	}
	var se *sdkerrors.ServerError
	if !errors.As(err, &se) {
		t.Fatalf("error %v (%T) is not a *errors.ServerError", err, err)
	}
	if se.ErrorCode() != code {
		t.Fatalf("error code %q (HTTP %d, %s), want %q", se.ErrorCode(), se.HttpStatus(), se.Message(), code)
	}
	if se.RequestId() == "" {
		t.Errorf("error reply has no RequestId")
	}
	return se
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func createENI(t *testing.T, c *ecs.Client, vsw string, tags map[string]string) *ecs.CreateNetworkInterfaceResponse {
	t.Helper()
	req := ecs.CreateCreateNetworkInterfaceRequest()
	req.VSwitchId = vsw
	req.SecurityGroupId = "sg-test"
	var ts []ecs.CreateNetworkInterfaceTag
	for k, v := range tags {
		ts = append(ts, ecs.CreateNetworkInterfaceTag{Key: k, Value: v})
	}
	if len(ts) > 0 {
		req.Tag = &ts
	}
	resp, err := c.CreateNetworkInterface(req)
	if err != nil {
		t.Fatalf("CreateNetworkInterface: %v", err)
	}
	return resp
}

func attach(t *testing.T, c *ecs.Client, inst, eniID string) error {
	t.Helper()
	req := ecs.CreateAttachNetworkInterfaceRequest()
	req.InstanceId = inst
	req.NetworkInterfaceId = eniID
	_, err := c.AttachNetworkInterface(req)
	return err
}

func detach(c *ecs.Client, inst, eniID string) error {
	req := ecs.CreateDetachNetworkInterfaceRequest()
	req.InstanceId = inst
	req.NetworkInterfaceId = eniID
	_, err := c.DetachNetworkInterface(req)
	return err
}

func deleteENI(c *ecs.Client, eniID string) error {
	req := ecs.CreateDeleteNetworkInterfaceRequest()
	req.NetworkInterfaceId = eniID
	_, err := c.DeleteNetworkInterface(req)
	return err
}

func assignN(c *ecs.Client, eniID string, n int, token string) (*ecs.AssignPrivateIpAddressesResponse, error) {
	req := ecs.CreateAssignPrivateIpAddressesRequest()
	req.NetworkInterfaceId = eniID
	req.SecondaryPrivateIpAddressCount = requests.NewInteger(n)
	req.ClientToken = token
	return c.AssignPrivateIpAddresses(req)
}

func describeENI(t *testing.T, c *ecs.Client, id string) ecs.NetworkInterfaceSet {
	t.Helper()
	req := ecs.CreateDescribeNetworkInterfacesRequest()
	req.NetworkInterfaceId = &[]string{id}
	resp, err := c.DescribeNetworkInterfaces(req)
	if err != nil {
		t.Fatalf("DescribeNetworkInterfaces %s: %v", id, err)
	}
	if len(resp.NetworkInterfaceSets.NetworkInterfaceSet) != 1 {
		t.Fatalf("DescribeNetworkInterfaces %s returned %d ENIs, want 1", id, len(resp.NetworkInterfaceSets.NetworkInterfaceSet))
	}
	return resp.NetworkInterfaceSets.NetworkInterfaceSet[0]
}

// waitStatus polls the ENI through the API until it has status, as a client would.
func waitStatus(t *testing.T, c *ecs.Client, id, status string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := describeENI(t, c, id).Status
		if got == status {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("ENI %s status %s, want %s after 10s", id, got, status)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestSignatureGoodAndBad(t *testing.T) {
	_, addr := NewTestServer(t, TestConfig())
	good, _ := NewTestClients(t, addr)
	if _, err := good.DescribeInstanceTypes(ecs.CreateDescribeInstanceTypesRequest()); err != nil {
		t.Fatalf("signed with the right secret: %v", err)
	}
	bad, _, err := NewClients(TestRegion, addr, TestAccessKeyID, "wrong-secret")
	must(t, err)
	_, err = bad.DescribeInstanceTypes(ecs.CreateDescribeInstanceTypesRequest())
	se := wantCode(t, err, CodeSignatureDoesNotMatch)
	if se.HttpStatus() != 400 {
		t.Errorf("HTTP status %d, want 400", se.HttpStatus())
	}
	unknown, _, err := NewClients(TestRegion, addr, "LTAInobody", TestAccessKeySecret)
	must(t, err)
	_, err = unknown.DescribeInstanceTypes(ecs.CreateDescribeInstanceTypesRequest())
	wantCode(t, err, CodeInvalidAccessKeyID)
}

func TestDescribeInstanceTypes(t *testing.T) {
	_, addr := NewTestServer(t, TestConfig())
	c, _ := NewTestClients(t, addr)
	req := ecs.CreateDescribeInstanceTypesRequest()
	req.InstanceTypes = &[]string{"ecs.g7.large", "ecs.g7.4xlarge"}
	resp, err := c.DescribeInstanceTypes(req)
	must(t, err)
	got := map[string][2]int{}
	for _, it := range resp.InstanceTypes.InstanceType {
		got[it.InstanceTypeId] = [2]int{it.EniQuantity, it.EniPrivateIpAddressQuantity}
	}
	want := map[string][2]int{"ecs.g7.large": {3, 6}, "ecs.g7.4xlarge": {8, 20}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("instance types %v, want %v", got, want)
	}
}

func TestDescribeInstances(t *testing.T) {
	cfg := TestConfig()
	cfg.AddInstance("i-test-0002", "ecs.g7.xlarge", "vsw-test-b", "192.168.2.20")
	_, addr := NewTestServer(t, cfg)
	c, _ := NewTestClients(t, addr)

	req := ecs.CreateDescribeInstancesRequest()
	req.InstanceIds = `["i-test-0002"]`
	resp, err := c.DescribeInstances(req)
	must(t, err)
	if len(resp.Instances.Instance) != 1 {
		t.Fatalf("got %d instances, want 1", len(resp.Instances.Instance))
	}
	in := resp.Instances.Instance[0]
	if in.InstanceType != "ecs.g7.xlarge" || in.VpcAttributes.VSwitchId != "vsw-test-b" ||
		!slices.Equal(in.VpcAttributes.PrivateIpAddress.IpAddress, []string{"192.168.2.20"}) || in.Status != "Running" {
		t.Fatalf("instance %+v does not match the config", in)
	}
	if n := len(in.NetworkInterfaces.NetworkInterface); n != 1 || in.NetworkInterfaces.NetworkInterface[0].Type != TypePrimary {
		t.Fatalf("instance has %d ENIs listed (%+v), want only its primary", n, in.NetworkInterfaces.NetworkInterface)
	}

	all, err := c.DescribeInstances(ecs.CreateDescribeInstancesRequest())
	must(t, err)
	if all.TotalCount != 2 {
		t.Fatalf("TotalCount %d, want 2", all.TotalCount)
	}

	attr := ecs.CreateDescribeInstanceAttributeRequest()
	attr.InstanceId = "i-test-0001"
	ar, err := c.DescribeInstanceAttribute(attr)
	must(t, err)
	if ar.InstanceType != "ecs.g7.large" || ar.ZoneId != "cn-hangzhou-h" || ar.VpcAttributes.VpcId != "vpc-test" {
		t.Fatalf("DescribeInstanceAttribute = %+v", ar)
	}
	attr.InstanceId = "i-missing"
	_, err = c.DescribeInstanceAttribute(attr)
	wantCode(t, err, CodeInstanceNotFound)
}

func TestPrimaryENIExistsFromStart(t *testing.T) {
	_, addr := NewTestServer(t, TestConfig())
	c, _ := NewTestClients(t, addr)
	req := ecs.CreateDescribeNetworkInterfacesRequest()
	req.InstanceId = "i-test-0001"
	resp, err := c.DescribeNetworkInterfaces(req)
	must(t, err)
	set := resp.NetworkInterfaceSets.NetworkInterfaceSet
	if len(set) != 1 {
		t.Fatalf("instance has %d ENIs, want 1", len(set))
	}
	p := set[0]
	if p.Type != TypePrimary || p.Status != StatusInUse || p.PrivateIpAddress != "192.168.1.10" ||
		p.MacAddress[:8] != "00:16:3e" || p.Attachment.InstanceId != "i-test-0001" {
		t.Fatalf("primary ENI %+v", p)
	}
	if len(p.PrivateIpSets.PrivateIpSet) != 1 || !p.PrivateIpSets.PrivateIpSet[0].Primary {
		t.Fatalf("primary ENI IP sets %+v", p.PrivateIpSets)
	}
	// The primary ENI can be neither detached nor deleted.
	wantCode(t, detach(c, "i-test-0001", p.NetworkInterfaceId), CodeInvalidOperationPrimary)
	wantCode(t, deleteENI(c, p.NetworkInterfaceId), CodeInvalidEniState)
}

func TestENILifecycleHappyPath(t *testing.T) {
	e, addr := NewTestServer(t, TestConfig())
	c, _ := NewTestClients(t, addr)

	created := createENI(t, c, "vsw-test-a", map[string]string{"creator": "tern"})
	if created.Status != StatusAvailable || created.Type != TypeSecondary || created.VSwitchId != "vsw-test-a" ||
		created.PrivateIpAddress == "" || len(created.Tags.Tag) != 1 || created.SecurityGroupIds.SecurityGroupId[0] != "sg-test" {
		t.Fatalf("CreateNetworkInterface reply %+v", created)
	}
	id := created.NetworkInterfaceId
	must(t, attach(t, c, "i-test-0001", id))
	waitStatus(t, c, id, StatusInUse)
	got := describeENI(t, c, id)
	if got.InstanceId != "i-test-0001" || got.Attachment.DeviceIndex != 1 {
		t.Fatalf("attached ENI %+v", got)
	}

	resp, err := assignN(c, id, 2, "")
	must(t, err)
	assigned := resp.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress
	if len(assigned) != 2 || resp.AssignedPrivateIpAddressesSet.NetworkInterfaceId != id {
		t.Fatalf("assign reply %+v", resp.AssignedPrivateIpAddressesSet)
	}
	got = describeENI(t, c, id)
	if len(got.PrivateIpSets.PrivateIpSet) != 3 {
		t.Fatalf("ENI has %d IPs after assigning 2, want 3", len(got.PrivateIpSets.PrivateIpSet))
	}

	un := ecs.CreateUnassignPrivateIpAddressesRequest()
	un.NetworkInterfaceId = id
	un.PrivateIpAddress = &[]string{assigned[0]}
	_, err = c.UnassignPrivateIpAddresses(un)
	must(t, err)
	if n := len(describeENI(t, c, id).PrivateIpSets.PrivateIpSet); n != 2 {
		t.Fatalf("ENI has %d IPs after unassigning one, want 2", n)
	}
	_, err = c.UnassignPrivateIpAddresses(un)
	wantCode(t, err, CodeIPUnassigned)

	must(t, detach(c, "i-test-0001", id))
	waitStatus(t, c, id, StatusAvailable)
	must(t, deleteENI(c, id))
	req := ecs.CreateDescribeNetworkInterfacesRequest()
	req.NetworkInterfaceId = &[]string{id}
	r, err := c.DescribeNetworkInterfaces(req)
	must(t, err)
	if len(r.NetworkInterfaceSets.NetworkInterfaceSet) != 0 {
		t.Fatalf("deleted ENI still listed: %+v", r.NetworkInterfaceSets.NetworkInterfaceSet)
	}
	s := e.Snapshot()
	if v, _ := s.VSwitch("vsw-test-a"); v.Available != 252-1 {
		t.Fatalf("vsw-test-a has %d free addresses after the ENI was deleted, want 251 (252 less the instance's primary)", v.Available)
	}
	for _, a := range []string{"CreateNetworkInterface", "AttachNetworkInterface", "AssignPrivateIpAddresses",
		"UnassignPrivateIpAddresses", "DetachNetworkInterface", "DeleteNetworkInterface"} {
		if s.Calls[a] == 0 {
			t.Errorf("Snapshot counted no %s calls", a)
		}
	}
}

func TestWrongStateErrors(t *testing.T) {
	cfg := TestConfig()
	cfg.Delays = TransitionDelays{Attach: Duration(time.Hour), Detach: Duration(time.Hour), Delete: Duration(time.Hour)}
	e, addr := NewTestServer(t, cfg)
	c, _ := NewTestClients(t, addr)

	id := createENI(t, c, "vsw-test-a", nil).NetworkInterfaceId
	wantCode(t, detach(c, "i-test-0001", id), CodeInvalidEniState) // Available, not attached
	must(t, attach(t, c, "i-test-0001", id))
	if got := describeENI(t, c, id).Status; got != StatusAttaching {
		t.Fatalf("status right after attach %s, want Attaching", got)
	}
	wantCode(t, attach(t, c, "i-test-0001", id), CodeInvalidEniState)
	wantCode(t, deleteENI(c, id), CodeInvalidEniState)
	_, err := assignN(c, id, 1, "")
	wantCode(t, err, CodeInvalidEniState)

	other := createENI(t, c, "vsw-test-a", nil).NetworkInterfaceId
	must(t, deleteENI(c, other))
	if got := describeENI(t, c, other).Status; got != StatusDeleting {
		t.Fatalf("status right after delete %s, want Deleting", got)
	}
	_, err = assignN(c, other, 1, "")
	wantCode(t, err, CodeInvalidEniState)

	// Not-found errors.
	wantCode(t, attach(t, c, "i-nope", id), CodeInstanceNotFound)
	wantCode(t, deleteENI(c, "eni-nope"), CodeEniNotFound)
	req := ecs.CreateCreateNetworkInterfaceRequest()
	req.VSwitchId = "vsw-nope"
	req.SecurityGroupId = "sg-test"
	_, err = c.CreateNetworkInterface(req)
	wantCode(t, err, CodeVSwitchNotFound)
	req.VSwitchId = "vsw-test-a"
	req.SecurityGroupId = "sg-nope"
	_, err = c.CreateNetworkInterface(req)
	wantCode(t, err, CodeSecurityGroupNotFound)

	if e.Snapshot().Errors[CodeInvalidEniState] != 5 {
		t.Fatalf("Snapshot counted %d InvalidEniState errors, want 5", e.Snapshot().Errors[CodeInvalidEniState])
	}
}

func TestAsyncStates(t *testing.T) {
	cfg := TestConfig()
	cfg.Delays = TransitionDelays{Attach: Duration(50 * time.Millisecond), Detach: Duration(50 * time.Millisecond), Delete: Duration(50 * time.Millisecond)}
	e, addr := NewTestServer(t, cfg)
	c, _ := NewTestClients(t, addr)

	id := createENI(t, c, "vsw-test-a", nil).NetworkInterfaceId
	must(t, attach(t, c, "i-test-0001", id))
	if got := describeENI(t, c, id).Status; got != StatusAttaching {
		t.Fatalf("status right after attach %s, want Attaching", got)
	}
	waitStatus(t, c, id, StatusInUse)
	must(t, detach(c, "i-test-0001", id))
	if got := describeENI(t, c, id).Status; got != StatusDetaching {
		t.Fatalf("status right after detach %s, want Detaching", got)
	}
	waitStatus(t, c, id, StatusAvailable)
	if got := describeENI(t, c, id); got.InstanceId != "" {
		t.Fatalf("detached ENI still names instance %q", got.InstanceId)
	}
	must(t, deleteENI(c, id))
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, ok := e.Snapshot().ENI(id); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ENI %s still exists 10s after delete", id)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestCreateClientTokenIdempotent(t *testing.T) {
	e, addr := NewTestServer(t, TestConfig())
	c, _ := NewTestClients(t, addr)
	req := ecs.CreateCreateNetworkInterfaceRequest()
	req.VSwitchId = "vsw-test-a"
	req.SecurityGroupId = "sg-test"
	req.ClientToken = "token-1"
	a, err := c.CreateNetworkInterface(req)
	must(t, err)
	req2 := ecs.CreateCreateNetworkInterfaceRequest() // a retry is a new request with a new nonce
	req2.VSwitchId = "vsw-test-a"
	req2.SecurityGroupId = "sg-test"
	req2.ClientToken = "token-1"
	b, err := c.CreateNetworkInterface(req2)
	must(t, err)
	if a.NetworkInterfaceId != b.NetworkInterfaceId || a.MacAddress != b.MacAddress {
		t.Fatalf("same ClientToken gave ENIs %s and %s", a.NetworkInterfaceId, b.NetworkInterfaceId)
	}
	if n := len(e.Snapshot().ENIs); n != 2 {
		t.Fatalf("%d ENIs exist, want 2 (primary + one created)", n)
	}
	req3 := ecs.CreateCreateNetworkInterfaceRequest()
	req3.VSwitchId = "vsw-test-a"
	req3.SecurityGroupId = "sg-test"
	req3.ClientToken = "token-2"
	d, err := c.CreateNetworkInterface(req3)
	must(t, err)
	if d.NetworkInterfaceId == a.NetworkInterfaceId || d.MacAddress == a.MacAddress {
		t.Fatalf("a different ClientToken returned the same ENI or MAC")
	}
}

func TestAssignClientTokenIdempotentAndExplicitIPs(t *testing.T) {
	e, addr := NewTestServer(t, TestConfig())
	c, _ := NewTestClients(t, addr)
	id := createENI(t, c, "vsw-test-a", nil).NetworkInterfaceId
	a, err := assignN(c, id, 2, "assign-1")
	must(t, err)
	b, err := assignN(c, id, 2, "assign-1")
	must(t, err)
	if !slices.Equal(a.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress, b.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress) {
		t.Fatalf("retry with the same token assigned %v then %v", a.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress, b.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress)
	}
	if st, _ := e.Snapshot().ENI(id); len(st.IPs) != 3 {
		t.Fatalf("ENI holds %d IPs after a retried assign of 2, want 3", len(st.IPs))
	}

	req := ecs.CreateAssignPrivateIpAddressesRequest()
	req.NetworkInterfaceId = id
	req.PrivateIpAddress = &[]string{"192.168.1.200"}
	r, err := c.AssignPrivateIpAddresses(req)
	must(t, err)
	if got := r.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress; !slices.Equal(got, []string{"192.168.1.200"}) {
		t.Fatalf("explicit assign returned %v", got)
	}
	req2 := ecs.CreateAssignPrivateIpAddressesRequest()
	req2.NetworkInterfaceId = id
	req2.PrivateIpAddress = &[]string{"192.168.1.200"}
	_, err = c.AssignPrivateIpAddresses(req2)
	wantCode(t, err, CodeIPAddressAlreadyUsed)
	req3 := ecs.CreateAssignPrivateIpAddressesRequest()
	req3.NetworkInterfaceId = id
	req3.PrivateIpAddress = &[]string{"192.168.1.253"} // the gateway: reserved
	_, err = c.AssignPrivateIpAddresses(req3)
	wantCode(t, err, CodeIPNotInVSwitch)
}

func TestPaginationBothWays(t *testing.T) {
	_, addr := NewTestServer(t, TestConfig())
	c, _ := NewTestClients(t, addr)
	want := []string{}
	for range 7 {
		want = append(want, createENI(t, c, "vsw-test-b", map[string]string{"pool": "p"}).NetworkInterfaceId)
	}

	// NextToken + MaxResults.
	var got []string
	token := ""
	pages := 0
	for {
		req := ecs.CreateDescribeNetworkInterfacesRequest()
		req.VSwitchId = "vsw-test-b"
		req.MaxResults = requests.NewInteger(3)
		req.NextToken = token
		resp, err := c.DescribeNetworkInterfaces(req)
		must(t, err)
		pages++
		for _, n := range resp.NetworkInterfaceSets.NetworkInterfaceSet {
			got = append(got, n.NetworkInterfaceId)
		}
		if resp.NextToken == "" {
			break
		}
		token = resp.NextToken
	}
	if pages != 3 || !slices.Equal(got, want) {
		t.Fatalf("token pagination: %d pages, %v; want 3 pages, %v", pages, got, want)
	}

	// PageNumber + PageSize.
	got = nil
	for page := 1; ; page++ {
		req := ecs.CreateDescribeNetworkInterfacesRequest()
		req.Tag = &[]ecs.DescribeNetworkInterfacesTag{{Key: "pool", Value: "p"}}
		req.PageNumber = requests.NewInteger(page)
		req.PageSize = requests.NewInteger(4)
		resp, err := c.DescribeNetworkInterfaces(req)
		must(t, err)
		if resp.TotalCount != 7 || resp.PageNumber != page || resp.PageSize != 4 {
			t.Fatalf("page %d: TotalCount %d PageNumber %d PageSize %d", page, resp.TotalCount, resp.PageNumber, resp.PageSize)
		}
		for _, n := range resp.NetworkInterfaceSets.NetworkInterfaceSet {
			got = append(got, n.NetworkInterfaceId)
		}
		if len(resp.NetworkInterfaceSets.NetworkInterfaceSet) < 4 {
			break
		}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("page pagination: %v, want %v", got, want)
	}

	req := ecs.CreateDescribeNetworkInterfacesRequest()
	req.NextToken = "garbage"
	_, err := c.DescribeNetworkInterfaces(req)
	wantCode(t, err, "InvalidParameter.NextToken")
}

func TestDescribeNetworkInterfacesFilters(t *testing.T) {
	cfg := TestConfig()
	_, addr := NewTestServer(t, cfg)
	c, _ := NewTestClients(t, addr)
	a := createENI(t, c, "vsw-test-a", map[string]string{"k": "1"}).NetworkInterfaceId
	b := createENI(t, c, "vsw-test-b", map[string]string{"k": "2"}).NetworkInterfaceId
	must(t, attach(t, c, "i-test-0001", a))

	ids := func(mod func(*ecs.DescribeNetworkInterfacesRequest)) []string {
		req := ecs.CreateDescribeNetworkInterfacesRequest()
		mod(req)
		resp, err := c.DescribeNetworkInterfaces(req)
		must(t, err)
		var out []string
		for _, n := range resp.NetworkInterfaceSets.NetworkInterfaceSet {
			out = append(out, n.NetworkInterfaceId)
		}
		slices.Sort(out)
		return out
	}
	cases := []struct {
		name string
		mod  func(*ecs.DescribeNetworkInterfacesRequest)
		want []string
	}{
		{"status Available", func(r *ecs.DescribeNetworkInterfacesRequest) { r.Status = StatusAvailable }, []string{b}},
		{"type Secondary", func(r *ecs.DescribeNetworkInterfacesRequest) { r.Type = TypeSecondary }, sorted(a, b)},
		{"vSwitch b", func(r *ecs.DescribeNetworkInterfacesRequest) { r.VSwitchId = "vsw-test-b" }, []string{b}},
		{"tag k=1", func(r *ecs.DescribeNetworkInterfacesRequest) {
			r.Tag = &[]ecs.DescribeNetworkInterfacesTag{{Key: "k", Value: "1"}}
		}, []string{a}},
		{"ids", func(r *ecs.DescribeNetworkInterfacesRequest) { r.NetworkInterfaceId = &[]string{b, "eni-missing"} }, []string{b}},
	}
	for _, tc := range cases {
		if got := ids(tc.mod); !slices.Equal(got, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
}

func sorted(s ...string) []string { slices.Sort(s); return s }

func TestENIQuota(t *testing.T) {
	_, addr := NewTestServer(t, TestConfig()) // ecs.g7.large: 3 ENIs including the primary
	c, _ := NewTestClients(t, addr)
	for range 2 {
		must(t, attach(t, c, "i-test-0001", createENI(t, c, "vsw-test-a", nil).NetworkInterfaceId))
	}
	third := createENI(t, c, "vsw-test-a", nil).NetworkInterfaceId
	wantCode(t, attach(t, c, "i-test-0001", third), CodeEniPerInstanceLimit)
}

func TestIPQuota(t *testing.T) {
	_, addr := NewTestServer(t, TestConfig()) // ecs.g7.large: 6 IPs per ENI including the primary
	c, _ := NewTestClients(t, addr)
	id := createENI(t, c, "vsw-test-a", nil).NetworkInterfaceId
	must(t, attach(t, c, "i-test-0001", id))
	_, err := assignN(c, id, 5, "")
	must(t, err)
	_, err = assignN(c, id, 1, "")
	wantCode(t, err, CodeIpv4CountExceeded)

	// Before attachment the API's own cap applies (49 secondaries); past it the error is the
	// per-ENI one too (QuotaExceeded.PrivateIpAddress is the vSwitch running out).
	free := createENI(t, c, "vsw-test-b", nil).NetworkInterfaceId
	_, err = assignN(c, free, 49, "")
	must(t, err)
	_, err = assignN(c, free, 1, "")
	if se := wantCode(t, err, CodeIpv4CountExceeded); se.HttpStatus() != 403 {
		t.Errorf("Ipv4CountExceeded with HTTP %d, want 403", se.HttpStatus())
	}
	// ... and an ENI holding more than the instance type allows cannot be attached.
	big := createENI(t, c, "vsw-test-a", nil).NetworkInterfaceId
	_, err = assignN(c, big, 6, "") // 7 IPs > 6
	must(t, err)
	wantCode(t, attach(t, c, "i-test-0001", big), CodeIpv4CountExceeded)
}

func TestVSwitchExhaustion(t *testing.T) {
	cfg := TestConfig()
	cfg.VSwitches = append(cfg.VSwitches, VSwitchConfig{ID: "vsw-tiny", Zone: "cn-hangzhou-h", CIDR: "192.168.3.0/29"})
	_, addr := NewTestServer(t, cfg)
	c, v := NewTestClients(t, addr)

	free := func() int64 {
		req := vpc.CreateDescribeVSwitchesRequest()
		req.VSwitchId = "vsw-tiny"
		resp, err := v.DescribeVSwitches(req)
		must(t, err)
		if len(resp.VSwitches.VSwitch) != 1 {
			t.Fatalf("DescribeVSwitches returned %d vSwitches", len(resp.VSwitches.VSwitch))
		}
		return resp.VSwitches.VSwitch[0].AvailableIpAddressCount
	}
	if got := free(); got != 4 { // /29: 8 - first - last three
		t.Fatalf("a /29 has %d available addresses, want 4", got)
	}
	id := createENI(t, c, "vsw-tiny", nil).NetworkInterfaceId
	_, err := assignN(c, id, 3, "")
	must(t, err)
	if got := free(); got != 0 {
		t.Fatalf("%d addresses left, want 0", got)
	}
	// An assign the vSwitch cannot serve: QuotaExceeded.PrivateIpAddress, HTTP 400, as the
	// published error table has it; a create says InvalidVSwitchId.IpNotEnough.
	_, err = assignN(c, id, 1, "")
	if se := wantCode(t, err, CodeQuotaPrivateIP); se.HttpStatus() != 400 {
		t.Errorf("QuotaExceeded.PrivateIpAddress with HTTP %d, want 400", se.HttpStatus())
	}
	req := ecs.CreateCreateNetworkInterfaceRequest()
	req.VSwitchId = "vsw-tiny"
	req.SecurityGroupId = "sg-test"
	_, err = c.CreateNetworkInterface(req)
	wantCode(t, err, CodeVSwitchIPNotEnough)

	all, err := v.DescribeVSwitches(vpc.CreateDescribeVSwitchesRequest())
	must(t, err)
	if all.TotalCount != 3 {
		t.Fatalf("DescribeVSwitches TotalCount %d, want 3", all.TotalCount)
	}
	for _, s := range all.VSwitches.VSwitch {
		p := netip.MustParsePrefix(s.CidrBlock)
		if s.VSwitchId == "vsw-test-a" && s.AvailableIpAddressCount != 251 {
			t.Errorf("vsw-test-a (%s) available %d, want 251", p, s.AvailableIpAddressCount)
		}
	}
}

func TestCreateParameters(t *testing.T) {
	cfg := TestConfig()
	cfg.SecurityGroups = append(cfg.SecurityGroups, "sg-test-2")
	_, addr := NewTestServer(t, cfg)
	c, _ := NewTestClients(t, addr)

	req := ecs.CreateCreateNetworkInterfaceRequest()
	req.VSwitchId = "vsw-test-a"
	req.SecurityGroupIds = &[]string{"sg-test", "sg-test-2"}
	req.PrimaryIpAddress = "192.168.1.100"
	req.PrivateIpAddress = &[]string{"192.168.1.101"}
	req.NetworkInterfaceName = "tern-eni"
	req.InstanceType = TypeTrunk
	r, err := c.CreateNetworkInterface(req)
	must(t, err)
	var ips []string
	for _, s := range r.PrivateIpSets.PrivateIpSet {
		ips = append(ips, fmt.Sprintf("%s/%v", s.PrivateIpAddress, s.Primary))
	}
	if r.PrivateIpAddress != "192.168.1.100" || !slices.Equal(ips, []string{"192.168.1.100/true", "192.168.1.101/false"}) ||
		!slices.Equal(r.SecurityGroupIds.SecurityGroupId, []string{"sg-test", "sg-test-2"}) ||
		r.NetworkInterfaceName != "tern-eni" || r.Type != TypeTrunk {
		t.Fatalf("CreateNetworkInterface reply %+v", r)
	}

	req2 := ecs.CreateCreateNetworkInterfaceRequest()
	req2.VSwitchId = "vsw-test-a"
	req2.SecurityGroupId = "sg-test"
	req2.SecondaryPrivateIpAddressCount = requests.NewInteger(3)
	r2, err := c.CreateNetworkInterface(req2)
	must(t, err)
	if len(r2.PrivateIpSets.PrivateIpSet) != 4 {
		t.Fatalf("created with 3 secondaries, got IP sets %+v", r2.PrivateIpSets)
	}

	req3 := ecs.CreateCreateNetworkInterfaceRequest()
	req3.VSwitchId = "vsw-test-a"
	_, err = c.CreateNetworkInterface(req3)
	wantCode(t, err, CodeMissingParameter)
}

func TestConcurrentAllocationsNeverCollide(t *testing.T) {
	cfg := TestConfig()
	for i := range 4 {
		cfg.AddInstance(fmt.Sprintf("i-par-%d", i), "ecs.g7.4xlarge", "vsw-test-b", fmt.Sprintf("192.168.2.%d", 200+i))
	}
	e, addr := NewTestServer(t, cfg)
	errc := make(chan error, 4)
	for i := range 4 {
		// One client per goroutine: the SDK's Client rewrites its shared http.Client timeout
		// on every call (sdk.Client.setTimeout), a data race when a client is shared.
		c, _ := NewTestClients(t, addr)
		go func() {
			for range 3 {
				req := ecs.CreateCreateNetworkInterfaceRequest()
				req.VSwitchId = "vsw-test-b"
				req.SecurityGroupId = "sg-test"
				r, err := c.CreateNetworkInterface(req)
				if err != nil {
					errc <- err
					return
				}
				if err := attachNoT(c, fmt.Sprintf("i-par-%d", i), r.NetworkInterfaceId); err != nil {
					errc <- err
					return
				}
				for range 3 {
					if _, err := assignN(c, r.NetworkInterfaceId, 5, ""); err != nil {
						errc <- err
						return
					}
				}
			}
			errc <- nil
		}()
	}
	for range 4 {
		must(t, <-errc)
	}
	s := e.Snapshot()
	seen := map[string]string{}
	total := 0
	for _, n := range s.ENIs {
		for _, ip := range n.IPs {
			if other, dup := seen[ip]; dup {
				t.Fatalf("%s is held by both %s and %s", ip, other, n.ID)
			}
			seen[ip] = n.ID
			if n.VSwitchID == "vsw-test-b" {
				total++
			}
		}
	}
	// 4 primaries + 4 nodes × 3 ENIs × (1 + 3×5) addresses.
	if want := 4 + 4*3*16; total != want {
		t.Fatalf("vsw-test-b holds %d addresses, want %d", total, want)
	}
	if v, _ := s.VSwitch("vsw-test-b"); v.Available != 252-total {
		t.Fatalf("vsw-test-b reports %d available with %d in use, want %d", v.Available, total, 252-total)
	}
}

func attachNoT(c *ecs.Client, inst, eniID string) error {
	req := ecs.CreateAttachNetworkInterfaceRequest()
	req.InstanceId = inst
	req.NetworkInterfaceId = eniID
	_, err := c.AttachNetworkInterface(req)
	return err
}
