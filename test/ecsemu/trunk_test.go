package ecsemu

import (
	"slices"
	"testing"
	"time"

	"github.com/aliyun/alibaba-cloud-sdk-go/services/ecs"
)

// trunkConfig is TestConfig with trunking on ecs.g7.large: 3 ENIs, EniTotalQuantity 6, so 3
// member ENIs.
func trunkConfig(t *testing.T) *Config {
	cfg := TestConfig()
	if !cfg.SetTrunking("ecs.g7.large", 6) {
		t.Fatal("TestConfig has no ecs.g7.large")
	}
	return cfg
}

func createTyped(t *testing.T, c *ecs.Client, instanceType string) *ecs.CreateNetworkInterfaceResponse {
	t.Helper()
	req := ecs.CreateCreateNetworkInterfaceRequest()
	req.VSwitchId = "vsw-test-a"
	req.SecurityGroupIds = &[]string{"sg-test"}
	req.InstanceType = instanceType
	resp, err := c.CreateNetworkInterface(req)
	must(t, err)
	return resp
}

func attachMember(c *ecs.Client, inst, eniID, trunkID string) error {
	req := ecs.CreateAttachNetworkInterfaceRequest()
	req.InstanceId = inst
	req.NetworkInterfaceId = eniID
	req.TrunkNetworkInstanceId = trunkID
	_, err := c.AttachNetworkInterface(req)
	return err
}

func detachMember(c *ecs.Client, inst, eniID, trunkID string) error {
	req := ecs.CreateDetachNetworkInterfaceRequest()
	req.InstanceId = inst
	req.NetworkInterfaceId = eniID
	req.TrunkNetworkInstanceId = trunkID
	_, err := c.DetachNetworkInterface(req)
	return err
}

// TestTrunkAndMembersThroughSDK drives the whole trunk life cycle with the real SDK and reads
// every trunk field back through the SDK's own response structs.
func TestTrunkAndMembersThroughSDK(t *testing.T) {
	e, addr := NewTestServer(t, trunkConfig(t))
	c, _ := NewTestClients(t, addr)

	tr := createTyped(t, c, TypeTrunk)
	if tr.Type != TypeTrunk {
		t.Fatalf("CreateNetworkInterface(InstanceType=Trunk) reply Type %q, want Trunk", tr.Type)
	}
	trunk := tr.NetworkInterfaceId
	m1 := createTyped(t, c, TypeSecondary).NetworkInterfaceId
	m2 := createTyped(t, c, "").NetworkInterfaceId

	// A member needs its trunk InUse first.
	wantCode(t, attachMember(c, "i-test-0001", m1, trunk), CodeInvalidEniState)
	must(t, attach(t, c, "i-test-0001", trunk))
	waitStatus(t, c, trunk, StatusInUse)
	if got := describeENI(t, c, trunk); got.Type != TypeTrunk || got.Attachment.DeviceIndex != 1 {
		t.Fatalf("attached trunk ENI: Type %q DeviceIndex %d, want Trunk at device 1", got.Type, got.Attachment.DeviceIndex)
	}

	must(t, attachMember(c, "i-test-0001", m1, trunk))
	must(t, attachMember(c, "i-test-0001", m2, trunk))
	waitStatus(t, c, m1, StatusInUse)
	waitStatus(t, c, m2, StatusInUse)
	g1, g2 := describeENI(t, c, m1), describeENI(t, c, m2)
	for _, g := range []ecs.NetworkInterfaceSet{g1, g2} {
		if g.Type != TypeMember || g.Attachment.TrunkNetworkInterfaceId != trunk || g.Attachment.InstanceId != "i-test-0001" {
			t.Fatalf("member %s: Type %q trunk %q instance %q, want Member of %s on i-test-0001",
				g.NetworkInterfaceId, g.Type, g.Attachment.TrunkNetworkInterfaceId, g.Attachment.InstanceId, trunk)
		}
	}
	if g1.Attachment.DeviceIndex != 1 || g2.Attachment.DeviceIndex != 2 {
		t.Fatalf("VLAN ids (DeviceIndex) %d, %d; want the cloud to hand out 1 and 2", g1.Attachment.DeviceIndex, g2.Attachment.DeviceIndex)
	}
	got := describeENI(t, c, trunk).Attachment.MemberNetworkInterfaceIds.MemberNetworkInterfaceId
	if !slices.Equal(got, []string{m1, m2}) {
		t.Fatalf("trunk lists members %v, want [%s %s]", got, m1, m2)
	}

	// Filters see the Member type; the instance's device list and metadata do not see members.
	req := ecs.CreateDescribeNetworkInterfacesRequest()
	req.InstanceId = "i-test-0001"
	req.Type = TypeMember
	resp, err := c.DescribeNetworkInterfaces(req)
	must(t, err)
	if n := len(resp.NetworkInterfaceSets.NetworkInterfaceSet); n != 2 {
		t.Fatalf("Type=Member lists %d ENIs, want 2", n)
	}
	ir := ecs.CreateDescribeInstancesRequest()
	ir.InstanceIds = `["i-test-0001"]`
	inst, err := c.DescribeInstances(ir)
	must(t, err)
	if n := len(inst.Instances.Instance[0].NetworkInterfaces.NetworkInterface); n != 2 {
		t.Fatalf("DescribeInstances lists %d ENIs, want the primary and the trunk", n)
	}

	// Members do not count against EniQuantity: the third ENI slot is still free.
	third := createTyped(t, c, TypeSecondary).NetworkInterfaceId
	must(t, attach(t, c, "i-test-0001", third))
	waitStatus(t, c, third, StatusInUse)

	// A member detaches only through its trunk; the trunk cannot leave while it has members.
	wantCode(t, detach(c, "i-test-0001", m1), CodeInvalidParameter)
	wantCode(t, detachMember(c, "i-test-0001", third, trunk), CodeInvalidParameter)
	wantCode(t, detach(c, "i-test-0001", trunk), CodeInvalidEniState)
	must(t, detachMember(c, "i-test-0001", m1, trunk))
	waitStatus(t, c, m1, StatusAvailable)
	if g := describeENI(t, c, m1); g.Type != TypeSecondary || g.Attachment.TrunkNetworkInterfaceId != "" || g.Attachment.DeviceIndex != 0 {
		t.Fatalf("detached member: Type %q trunk %q VLAN %d, want a plain Secondary again", g.Type, g.Attachment.TrunkNetworkInterfaceId, g.Attachment.DeviceIndex)
	}
	// The freed VLAN id is handed out again.
	must(t, attachMember(c, "i-test-0001", m1, trunk))
	waitStatus(t, c, m1, StatusInUse)
	if v := describeENI(t, c, m1).Attachment.DeviceIndex; v != 1 {
		t.Fatalf("re-attached member got VLAN %d, want the freed 1", v)
	}

	// Everything comes apart: members, then the trunk; nothing is left.
	for _, m := range []string{m1, m2} {
		must(t, detachMember(c, "i-test-0001", m, trunk))
		waitStatus(t, c, m, StatusAvailable)
		must(t, deleteENI(c, m))
	}
	for _, id := range []string{trunk, third} {
		must(t, detach(c, "i-test-0001", id))
		waitStatus(t, c, id, StatusAvailable)
		must(t, deleteENI(c, id))
	}
	if s := e.Snapshot(); len(s.ENIs) != 1 {
		t.Fatalf("%d ENIs left, want only the primary: %+v", len(s.ENIs), s.ENIs)
	}
}

func TestMemberQuotaAndTrunkSupport(t *testing.T) {
	cfg := trunkConfig(t)
	cfg.AddInstance("i-test-0002", "ecs.g7.xlarge", "vsw-test-a", "192.168.1.11") // no trunking
	_, addr := NewTestServer(t, cfg)
	c, _ := NewTestClients(t, addr)

	// Bad InstanceType.
	req := ecs.CreateCreateNetworkInterfaceRequest()
	req.VSwitchId = "vsw-test-a"
	req.SecurityGroupId = "sg-test"
	req.InstanceType = "Bogus"
	_, err := c.CreateNetworkInterface(req)
	wantCode(t, err, CodeInvalidParameter)

	// A type without trunking refuses a trunk ENI.
	noTrunk := createTyped(t, c, TypeTrunk).NetworkInterfaceId
	wantCode(t, attach(t, c, "i-test-0002", noTrunk), CodeInvalidEniType)

	trunk := createTyped(t, c, TypeTrunk).NetworkInterfaceId
	must(t, attach(t, c, "i-test-0001", trunk))
	waitStatus(t, c, trunk, StatusInUse)
	// One trunk per instance.
	wantCode(t, attach(t, c, "i-test-0001", noTrunk), CodeInvalidEniType)
	// A member of another instance's trunk, or of a non-trunk ENI, is refused.
	m := createTyped(t, c, TypeSecondary).NetworkInterfaceId
	wantCode(t, attachMember(c, "i-test-0002", m, trunk), CodeInvalidEniState)
	wantCode(t, attachMember(c, "i-test-0001", m, "eni-nope"), CodeEniNotFound)
	// A trunk cannot be a member.
	wantCode(t, attachMember(c, "i-test-0001", noTrunk, trunk), CodeInvalidEniType)

	// EniTotalQuantity 6 − EniQuantity 3 = 3 members.
	quota := MemberQuota(cfg.InstanceTypes[0])
	if quota != 3 {
		t.Fatalf("MemberQuota(ecs.g7.large with total 6) = %d, want 3", quota)
	}
	for i := range quota {
		id := createTyped(t, c, TypeSecondary).NetworkInterfaceId
		if err := attachMember(c, "i-test-0001", id, trunk); err != nil {
			t.Fatalf("member %d of %d: %v", i+1, quota, err)
		}
	}
	wantCode(t, attachMember(c, "i-test-0001", m, trunk), CodeEniPerInstanceLimit)
}

// TestMemberAttachIsAsync checks the Attaching state and the member delay, and that Describe
// with a status lag still agrees with the trunk's member list.
func TestMemberAttachIsAsync(t *testing.T) {
	cfg := trunkConfig(t)
	cfg.Delays.MemberAttach = Duration(time.Hour)
	e, addr := NewTestServer(t, cfg)
	c, _ := NewTestClients(t, addr)
	trunk := createTyped(t, c, TypeTrunk).NetworkInterfaceId
	must(t, attach(t, c, "i-test-0001", trunk))
	m := createTyped(t, c, TypeSecondary).NetworkInterfaceId
	must(t, attachMember(c, "i-test-0001", m, trunk))
	if g := describeENI(t, c, m); g.Status != StatusAttaching || g.Type != TypeMember || g.Attachment.DeviceIndex != 1 {
		t.Fatalf("member right after attach: %s %s VLAN %d, want Attaching Member VLAN 1", g.Status, g.Type, g.Attachment.DeviceIndex)
	}
	e.FinishTransitions()
	if g := describeENI(t, c, m); g.Status != StatusInUse {
		t.Fatalf("member after the transition: %s, want InUse", g.Status)
	}
	if s, _ := e.Snapshot().ENI(m); s.Trunk != trunk || s.DeviceIndex != 1 || !s.Plugged || s.Type != TypeMember {
		t.Fatalf("snapshot of the member %+v", s)
	}
}

func TestRealisticMemberDelay(t *testing.T) {
	_, d, _ := RealisticTiming()
	if time.Duration(d.MemberAttach) != 2*time.Second {
		t.Fatalf("realistic member attach %v, want Terway's 2 s first wait", time.Duration(d.MemberAttach))
	}
}
