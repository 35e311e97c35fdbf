package ipam

import (
	"context"
	"errors"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/store"
	"github.com/tern-net/tern/ipam/trunk"
	"github.com/tern-net/tern/test/ecsemu"
)

// TestMemberENIHonoursPodNetworks: a member pod's k8s.aliyun.com/pod-networks annotation puts
// its member ENI in the vSwitch and security groups it names (the cloud, through the real SDK,
// records them), a retry asks alike and gets the same member, a pod without the annotation
// gets the trunk's vSwitch and eni_conf's group, and a vSwitch of another zone is refused
// before anything is created, naming the zone.
func TestMemberENIHonoursPodNetworks(t *testing.T) {
	cfg := ecsemu.TestConfig()
	if !cfg.SetTrunking("ecs.g7.large", 3+3) {
		t.Fatal("ecs.g7.large not in the test config")
	}
	cfg.SecurityGroups = append(cfg.SecurityGroups, "sg-pods-a", "sg-pods-b")
	cfg.VSwitches = append(cfg.VSwitches, ecsemu.VSwitchConfig{ID: "vsw-test-other-zone", Zone: "cn-hangzhou-i", CIDR: "192.168.9.0/24"})
	emu, ep := ecsemu.NewTestServer(t, cfg)
	e := &env{t: t, emu: emu, endpoint: ep, dbPath: filepath.Join(t.TempDir(), "ipam.db")}
	ctx := context.Background()
	st, err := store.Open(e.dbPath, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	m, err := NewMemberENIs(KindDeps{Cloud: e.client(), Store: st, Config: eniConf(t, 0, 5, "vsw-test-a"), InstanceID: smallNode,
		NodeName: nodeName, ClusterID: clusterTag, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	request := func(name, podNetworks string) Request {
		t.Helper()
		ann := map[string]string{trunk.AnnotationPodENI: "true"}
		if podNetworks != "" {
			ann[AnnotationPodNetworks] = podNetworks
		}
		r, err := RequestFromPod(PodKey{Namespace: "ns", Name: name, ContainerID: "c-" + name}, ann, false)
		if err != nil || r.Kind != KindMember {
			t.Fatalf("request of %s: %+v %v", name, r, err)
		}
		return r
	}
	inCloud := func(al Allocation) ecsemu.ENIState {
		t.Helper()
		for _, en := range emu.Snapshot().ENIs {
			if en.ID == al.MemberENI {
				return en
			}
		}
		t.Fatalf("member %s of %s not in the cloud", al.MemberENI, al.IP)
		return ecsemu.ENIState{}
	}

	placed := request("placed", `{"podNetworks":[{"interface":"eth0","vSwitchOptions":["vsw-test-b"],"securityGroupIDs":["sg-pods-a","sg-pods-b"]}]}`)
	al, err := m.Allocate(ctx, placed)
	if err != nil {
		t.Fatal(err)
	}
	ce := inCloud(al)
	if ce.VSwitchID != "vsw-test-b" || !slices.Equal(ce.SecurityGroups, []string{"sg-pods-a", "sg-pods-b"}) || ce.Type != "Member" ||
		!netip.MustParsePrefix("192.168.2.0/24").Contains(al.IP) || ce.PrimaryIP != al.IP.String() {
		t.Fatalf("member of the placed pod: cloud %+v, allocation %+v; want vsw-test-b (192.168.2.0/24) with sg-pods-a, sg-pods-b", ce, al)
	}
	// The pod's traffic still crosses the trunk: its link, table and gateway are the trunk's.
	if trunkENI := m.Trunk(); al.ENI.ID != trunkENI.ID || al.ENI.VSwitchID != "vsw-test-a" {
		t.Fatalf("allocation's ENI %+v, want the trunk %s in vsw-test-a", al.ENI, trunkENI.ID)
	}
	again, err := m.Allocate(ctx, placed)
	if err != nil || again.MemberENI != al.MemberENI {
		t.Fatalf("repeated request: %+v %v, want %s", again, err, al.MemberENI)
	}

	plain, err := m.Allocate(ctx, request("plain", ""))
	if err != nil {
		t.Fatal(err)
	}
	if ce := inCloud(plain); ce.VSwitchID != "vsw-test-a" || !slices.Equal(ce.SecurityGroups, []string{"sg-test"}) {
		t.Fatalf("member without pod-networks: cloud %+v, want vsw-test-a with sg-test", ce)
	}

	before := len(emu.Snapshot().ENIs)
	_, err = m.Allocate(ctx, request("elsewhere", `{"podNetworks":[{"vSwitchOptions":["vsw-test-other-zone"]}]}`))
	if !errors.Is(err, aliyun.ErrBadVSwitch) {
		t.Fatalf("a vSwitch of another zone: %v, want ErrBadVSwitch", err)
	}
	t.Logf("refused as: %v", err)
	if after := len(emu.Snapshot().ENIs); after != before {
		t.Fatalf("the refused request left %d ENIs in the cloud, %d before", after, before)
	}
	if c := m.Capacity(); c.InUse != 2 || len(m.Allocations()) != 2 {
		t.Fatalf("after the refusal: %+v, allocations %v; want the two pods only", c, m.Allocations())
	}
	for _, name := range []string{"placed", "plain"} {
		if err := m.Release(ctx, PodKey{Namespace: "ns", Name: name, ContainerID: "c-" + name}); err != nil {
			t.Fatal(err)
		}
	}
	for _, en := range emu.Snapshot().ENIs {
		if en.Tags[trunk.TagRole] == trunk.RoleMember {
			t.Fatalf("member %s left after release", en.ID)
		}
	}
}
