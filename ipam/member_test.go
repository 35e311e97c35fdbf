package ipam

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/store"
	"github.com/tern-net/tern/ipam/trunk"
	"github.com/tern-net/tern/test/ecsemu"
)

// TestMemberKindFromConfigAndPod: eni_conf enable_eni_trunking turns the member kind on; a pod
// asks for it with Terway's k8s.aliyun.com/pod-eni (or pod-networking) annotation, an
// exclusive-ENI annotation wins, and a non-boolean pod-eni is a bad request, not a silent no.
func TestMemberKindFromConfigAndPod(t *testing.T) {
	if ks := EnabledKinds(NodeInfo{Config: eniconfig.Config{EnableENITrunking: true}}); len(ks) != 1 || ks[0].Kind != KindMember {
		t.Fatalf("trunking node: kinds %v, want member", ks)
	}
	if ks := EnabledKinds(NodeInfo{}); len(ks) != 0 {
		t.Fatalf("node without trunking offers %v", ks)
	}
	k := PodKey{Namespace: "ns", Name: "p", ContainerID: "c"}
	for _, c := range []struct {
		ann  map[string]string
		want Kind
	}{
		{map[string]string{trunk.AnnotationPodENI: "true"}, KindMember},
		{map[string]string{trunk.AnnotationPodENI: "false"}, KindENIIP},
		{map[string]string{trunk.AnnotationPodNetworking: "trunk-pods"}, KindMember},
		{map[string]string{trunk.AnnotationPodENI: "true", AnnotationENI: "true"}, KindENI},
	} {
		r, err := RequestFromPod(k, c.ann, false)
		if err != nil || r.Kind != c.want {
			t.Errorf("annotations %v: kind %q err %v, want %q", c.ann, r.Kind, err, c.want)
		}
	}
	if _, err := RequestFromPod(k, map[string]string{trunk.AnnotationPodENI: "yes please"}, false); !errors.Is(err, ErrBadPodRequest) {
		t.Fatalf("a non-boolean pod-eni: %v, want ErrBadPodRequest", err)
	}
}

// TestMemberENIsAgainstTheEmulator: on an ecs.g7.large made to support trunking with 3 member
// ENIs, the kind attaches a trunk ENI at start, gives three pods member ENIs (distinct
// addresses and VLAN ids, the same answer for a repeated request), refuses a fourth with
// ErrNodeFull, finds its pods again after a restart from the store, and leaves no member in
// the cloud after a release and a GC of pods that are gone.
func TestMemberENIsAgainstTheEmulator(t *testing.T) {
	cfg := ecsemu.TestConfig()
	if !cfg.SetTrunking("ecs.g7.large", 3+3) {
		t.Fatal("ecs.g7.large not in the test config")
	}
	emu, ep := ecsemu.NewTestServer(t, cfg)
	e := &env{t: t, emu: emu, endpoint: ep, dbPath: filepath.Join(t.TempDir(), "ipam.db")}
	ctx := context.Background()
	start := func() (*MemberENIs, *store.Store) {
		st, err := store.Open(e.dbPath, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		m, err := NewMemberENIs(KindDeps{Cloud: e.client(), Store: st, Config: eniConf(t, 0, 5, "vsw-test-a"), InstanceID: smallNode,
			NodeName: nodeName, ClusterID: clusterTag, Logger: zaptest.NewLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Start(ctx); err != nil {
			t.Fatal(err)
		}
		return m, st
	}
	members := func() map[string]ecsemu.ENIState {
		out := map[string]ecsemu.ENIState{}
		for _, en := range emu.Snapshot().ENIs {
			if en.Tags[trunk.TagRole] == trunk.RoleMember {
				out[en.ID] = en
			}
		}
		return out
	}
	m, st := start()
	if c := m.Capacity(); c.Capacity != 3 || c.ExtendedResource != ResourceMemberENI {
		t.Fatalf("capacity %+v, want 3 %s", c, ResourceMemberENI)
	}
	keys := []PodKey{{"ns", "a", "c1"}, {"ns", "b", "c2"}, {"ns", "c", "c3"}}
	ips, vlans := map[string]bool{}, map[int]bool{}
	for _, k := range keys {
		al, err := m.Allocate(ctx, Request{Key: k, Kind: KindMember})
		if err != nil {
			t.Fatal(err)
		}
		cl, ok := members()[al.MemberENI]
		if al.Kind != KindMember || ips[al.IP.String()] || vlans[al.VLAN] || !ok || cl.Trunk != al.ENI.ID || cl.DeviceIndex != al.VLAN || cl.PrimaryIP != al.IP.String() {
			t.Fatalf("allocation %+v, cloud %+v (ok %v): want a new address and VLAN, as the cloud has them", al, cl, ok)
		}
		ips[al.IP.String()], vlans[al.VLAN] = true, true
		again, err := m.Allocate(ctx, Request{Key: k, Kind: KindMember})
		if err != nil || again.MemberENI != al.MemberENI {
			t.Fatalf("repeated request: %+v %v, want %s", again, err, al.MemberENI)
		}
	}
	if _, err := m.Allocate(ctx, Request{Key: PodKey{"ns", "d", "c4"}, Kind: KindMember}); !errors.Is(err, ErrNodeFull) {
		t.Fatalf("fourth member: %v, want ErrNodeFull", err)
	}
	before := m.Allocations()
	m.Stop()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	m, _ = start()
	if after := m.Allocations(); len(after) != 3 || fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("after a restart: %v, want %v", after, before)
	}
	if err := m.Release(ctx, keys[0]); err != nil {
		t.Fatal(err)
	}
	res, err := m.GC(ctx, func() map[string]bool { return map[string]bool{"ns/b": true} })
	if err != nil || len(res.ReleasedAllocations) != 1 || res.ReleasedAllocations[0] != keys[2] {
		t.Fatalf("GC: %+v %v, want ns/c released", res, err)
	}
	if left := members(); len(left) != 1 {
		t.Fatalf("members left %v, want ns/b's only", left)
	}
	if err := m.Release(ctx, keys[1]); err != nil {
		t.Fatal(err)
	}
	if left := members(); len(left) != 0 || len(m.Allocations()) != 0 {
		t.Fatalf("after every release: cloud %v, allocations %v", left, m.Allocations())
	}
}

// TestMemberENIUnfinishedAddReleasedAtDel: an ADD whose context ends during the member's
// attach leaves its record (the cloud may still finish the attach); the sandbox's DEL through
// ipam.Node releases it, so the quota slot and the member do not outlive the sandbox.
func TestMemberENIUnfinishedAddReleasedAtDel(t *testing.T) {
	cfg := ecsemu.TestConfig()
	cfg.SetTrunking("ecs.g7.large", 3+1)
	cfg.Delays.MemberAttach = ecsemu.Duration(300 * time.Millisecond)
	emu, ep := ecsemu.NewTestServer(t, cfg)
	e := &env{t: t, emu: emu, endpoint: ep, dbPath: filepath.Join(t.TempDir(), "ipam.db")}
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
	ctx := context.Background()
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	node := NewNode(noAllocator{}, []Resource{m}, nil)
	key := PodKey{"ns", "a", "c1"}
	actx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	_, err = node.AllocateFor(actx, Request{Key: key, Kind: KindMember})
	cancel()
	if err == nil {
		t.Fatal("the ADD finished inside 100 ms with a 300 ms member attach")
	}
	if _, err := node.AllocateFor(ctx, Request{Key: PodKey{"ns", "b", "c2"}, Kind: KindMember}); !errors.Is(err, ErrNodeFull) {
		t.Fatalf("second pod with the first one's record still held: %v, want ErrNodeFull (quota 1)", err)
	}
	if err := node.Release(ctx, key); err != nil {
		t.Fatal(err)
	}
	al, err := node.AllocateFor(ctx, Request{Key: PodKey{"ns", "b", "c2"}, Kind: KindMember})
	if err != nil {
		t.Fatalf("after the DEL of the unfinished sandbox: %v", err)
	}
	for _, en := range emu.Snapshot().ENIs {
		if en.Tags[trunk.TagRole] == trunk.RoleMember && en.ID != al.MemberENI {
			t.Fatalf("member %s (pod %s) outlived its sandbox", en.ID, en.Tags[trunk.TagPod])
		}
	}
}

// noAllocator is a default kind that holds nothing (the test exercises the member kind).
type noAllocator struct{ Allocator }

func (noAllocator) Allocations() map[PodKey]Allocation    { return map[PodKey]Allocation{} }
func (noAllocator) Release(context.Context, PodKey) error { return nil }

// TestExclusiveCapacityCountsTheTrunkENI: with both optional kinds on, the trunk ENI takes
// one of the instance's device slots, so aliyun/eni offers one ENI fewer, and an exclusive
// ADD past it is refused before any cloud call.
func TestExclusiveCapacityCountsTheTrunkENI(t *testing.T) {
	cfg := ecsemu.TestConfig()
	if !cfg.SetTrunking("ecs.g7.large", 3+3) { // EniQuantity 3: the primary, the trunk, one more
		t.Fatal("ecs.g7.large not in the test config")
	}
	emu, ep := ecsemu.NewTestServer(t, cfg)
	e := &env{t: t, emu: emu, endpoint: ep, dbPath: filepath.Join(t.TempDir(), "ipam.db")}
	ctx := context.Background()
	st, err := store.Open(e.dbPath, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var node *Node
	others := func(k Kind) func() int { return func() int { return node.ENIsHeldExcept(k) } }
	m, err := NewMemberENIs(KindDeps{Cloud: e.client(), Store: st, Config: eniConf(t, 0, 5, "vsw-test-a"), InstanceID: smallNode,
		NodeName: nodeName, ClusterID: clusterTag, Logger: zaptest.NewLogger(t), OtherENIs: others(KindMember)})
	if err != nil {
		t.Fatal(err)
	}
	x, err := NewExclusiveENIs(KindDeps{Cloud: e.client(), Store: st, Config: eniConf(t, 0, 5, "vsw-test-a"), InstanceID: smallNode,
		NodeName: nodeName, ClusterID: clusterTag, Logger: zaptest.NewLogger(t), OtherENIs: others(KindENI)})
	if err != nil {
		t.Fatal(err)
	}
	node = NewNode(noAllocator{}, []Resource{m, x}, nil)
	for _, r := range []Resource{m, x} {
		if err := r.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if m.Trunk().ID == "" {
		t.Fatal("the member kind attached no trunk ENI")
	}
	if c := x.Capacity(); c.Capacity != 1 {
		t.Fatalf("aliyun/eni capacity %d with the trunk attached on a 3-ENI instance, want 1 (3 − primary − trunk)", c.Capacity)
	}
	if _, err := x.Allocate(ctx, Request{Key: PodKey{"ns", "a", "c1"}, Kind: KindENI}); err != nil {
		t.Fatal(err)
	}
	total := func() int {
		n := 0
		for _, c := range emu.Snapshot().Calls {
			n += c
		}
		return n
	}
	calls := total()
	if _, err := x.Allocate(ctx, Request{Key: PodKey{"ns", "b", "c2"}, Kind: KindENI}); !errors.Is(err, ErrNodeFull) {
		t.Fatalf("second exclusive ENI: %v, want ErrNodeFull", err)
	}
	if n := total(); n != calls {
		t.Fatalf("the refused ADD made %d cloud calls, want none", n-calls)
	}
}
