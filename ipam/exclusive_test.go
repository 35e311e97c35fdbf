package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/store"
	"github.com/tern-net/tern/test/ecsemu"
)

// These tests drive the exclusive ENI kind through the real SDK against the emulator, beside
// the ENIIP pool on the same instance (they share its ENI quota).

// exclusiveENIs lists the cloud's exclusive ENIs (tagged tern.io/kind=eni).
func exclusiveENIs(s ecsemu.State) map[string]ecsemu.ENIState {
	out := map[string]ecsemu.ENIState{}
	for _, e := range s.ENIs {
		if e.Tags[TagKind] == string(KindENI) {
			out[e.ID] = e
		}
	}
	return out
}

// startNode starts the ENIIP pool and the exclusive kind behind one Node on instance.
func (e *env) startNode(instance string, cfg eniconfig.Config, cloud aliyun.Cloud) (*Node, *ExclusiveENIs, *store.Store) {
	e.t.Helper()
	st, err := store.Open(e.dbPath, time.Second)
	if err != nil {
		e.t.Fatal(err)
	}
	if cloud == nil {
		cloud = e.client()
	}
	var node *Node
	others := func(k Kind) func() int { return func() int { return node.ENIsHeldExcept(k) } }
	p, err := New(Options{
		Cloud: cloud, Store: st, Config: cfg, InstanceID: instance, NodeName: nodeName, ClusterID: clusterTag,
		Logger: zaptest.NewLogger(e.t).Named("pool"), AllocateWait: 20 * time.Second,
		BatchWindow: 20 * time.Millisecond, MaintainInterval: time.Hour, ListingGrace: e.grace, Now: e.now,
		OtherENIs: others(KindENIIP),
	})
	if err != nil {
		e.t.Fatal(err)
	}
	x, err := NewExclusiveENIs(KindDeps{Cloud: cloud, Store: st, Config: cfg, InstanceID: instance, NodeName: nodeName,
		ClusterID: clusterTag, Logger: zaptest.NewLogger(e.t), OtherENIs: others(KindENI), ListingGrace: e.grace, Now: e.now})
	if err != nil {
		e.t.Fatal(err)
	}
	node = NewNode(p, []Resource{x}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := node.Start(ctx); err != nil {
		e.t.Fatal(err)
	}
	return node, x, st
}

func TestExclusiveENIKindFromLabelAndPod(t *testing.T) {
	if ks := EnabledKinds(NodeInfo{Labels: map[string]string{LabelExclusiveENI: LabelExclusiveENIOnly}}); len(ks) != 1 || ks[0].Kind != KindENI {
		t.Fatalf("labelled node: kinds %v, want eni", ks)
	}
	if ks := EnabledKinds(NodeInfo{Labels: map[string]string{"other": "x"}}); len(ks) != 0 {
		t.Fatalf("unlabelled node offers %v", ks)
	}
	k := PodKey{Namespace: "ns", Name: "p", ContainerID: "c"}
	for _, c := range []struct {
		ann  map[string]string
		res  bool
		want Kind
	}{
		{nil, false, KindENIIP},
		{map[string]string{AnnotationENI: "true"}, false, KindENI},
		{map[string]string{"k8s.aliyun.com/ENI": "true"}, false, KindENI},
		{map[string]string{AnnotationENI: "false"}, false, KindENIIP},
		{nil, true, KindENI},
	} {
		r, err := RequestFromPod(k, c.ann, c.res)
		if err != nil || r.Kind != c.want {
			t.Errorf("annotations %v resource %v: kind %q err %v, want %q", c.ann, c.res, r.Kind, err, c.want)
		}
	}
	r, err := RequestFromPod(k, map[string]string{AnnotationENI: "true",
		AnnotationPodNetworks: `{"podNetworks":[{"interface":"eth0","vSwitchOptions":["vsw-b"],"securityGroupIDs":["sg-2"]}]}`}, false)
	if err != nil || len(r.VSwitchIDs) != 1 || r.VSwitchIDs[0] != "vsw-b" || len(r.SecurityGroups) != 1 || r.SecurityGroups[0] != "sg-2" {
		t.Fatalf("pod-networks: %+v %v", r, err)
	}
	if _, err := RequestFromPod(k, map[string]string{AnnotationPodNetworks: `{"podNetworks":`}, false); err == nil {
		t.Fatal("a malformed pod-networks annotation was accepted")
	}
}

// TestExclusiveENISharesTheQuotaWithENIIP: on an ecs.g7.large (3 ENIs: the primary and two
// for pods) an exclusive pod gets a dedicated attached ENI whose primary address is its IP;
// ENIIP pods then take the other ENI; a second exclusive pod finds the node full; the pool's
// listing leaves the exclusive ENI alone; releasing it deletes it in the cloud.
func TestExclusiveENISharesTheQuotaWithENIIP(t *testing.T) {
	e := newEnv(t)
	node, x, st := e.startNode(smallNode, eniConf(t, 0, 0, "vsw-test-a"), nil)
	defer st.Close()
	defer node.Stop()
	ctx := context.Background()

	if c := x.Capacity(); c.Capacity != 2 || c.InUse != 0 || c.ExtendedResource != ResourceENI {
		t.Fatalf("empty node: capacity %+v, want 2 (EniQuantity 3 − the primary)", c)
	}
	exKey := PodKey{Namespace: "default", Name: "ex-0", ContainerID: "cx0"}
	al, err := node.AllocateFor(ctx, Request{Key: exKey, Kind: KindENI})
	if err != nil {
		t.Fatal(err)
	}
	cloud := exclusiveENIs(e.emu.Snapshot())
	ce, ok := cloud[al.ENI.ID]
	if !ok || len(cloud) != 1 {
		t.Fatalf("cloud exclusive ENIs %v, want exactly %s", cloud, al.ENI.ID)
	}
	if ce.Status != aliyun.StatusInUse || ce.InstanceID != smallNode || ce.PrimaryIP != al.IP.String() || ce.MAC != al.ENI.MAC ||
		len(ce.IPs) != 1 || ce.Tags[TagPod] != "default/ex-0" || al.Kind != KindENI {
		t.Fatalf("exclusive ENI %+v does not match the allocation %+v", ce, al)
	}
	if again, err := node.AllocateFor(ctx, Request{Key: exKey, Kind: KindENI}); err != nil || again.ENI.ID != al.ENI.ID {
		t.Fatalf("repeated ADD: %+v %v, want the same ENI", again, err)
	}

	// ENIIP pods fill the one ENI left: 6 addresses.
	allocs := map[PodKey]Allocation{}
	for i := range 6 {
		a, err := node.Allocate(ctx, podKey(i))
		if err != nil {
			t.Fatalf("ENIIP pod %d: %v", i, err)
		}
		allocs[podKey(i)] = a
	}
	if c := x.Capacity(); c.Capacity != 1 || c.InUse != 1 {
		t.Fatalf("with one ENIIP ENI: exclusive capacity %+v, want 1 in use of 1", c)
	}
	if _, err := node.AllocateFor(ctx, Request{Key: PodKey{Namespace: "default", Name: "ex-1", ContainerID: "cx1"}, Kind: KindENI}); !errors.Is(err, ErrNodeFull) {
		t.Fatalf("second exclusive pod: %v, want ErrNodeFull", err)
	}
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	_, err = node.Allocate(actx, podKey(6))
	cancel()
	if !errors.Is(err, ErrNodeFull) {
		t.Fatalf("7th ENIIP pod: %v, want ErrNodeFull (the exclusive ENI holds the third slot)", err)
	}
	if n := len(exclusiveENIs(e.emu.Snapshot())); n != 1 {
		t.Fatalf("%d exclusive ENIs after the refused ADD, want 1", n)
	}
	// The pool's GC must neither adopt nor delete the exclusive ENI.
	live := func() map[string]bool {
		m := map[string]bool{"default/ex-0": true}
		for k := range allocs {
			m[k.Namespace+"/"+k.Name] = true
		}
		return m
	}
	for range 2 {
		res, err := node.GC(ctx, live)
		if err != nil {
			t.Fatal(err)
		}
		if len(res.AdoptedENIs)+len(res.DeletedENIs)+len(res.ReleasedAllocations) != 0 {
			t.Fatalf("GC with every pod alive changed something: %+v", res)
		}
	}
	if _, ok := node.Allocations()[exKey]; !ok {
		t.Fatal("the exclusive allocation is gone after GC")
	}
	if err := node.Release(ctx, exKey); err != nil {
		t.Fatal(err)
	}
	if n := exclusiveENIs(e.emu.Snapshot()); len(n) != 0 {
		t.Fatalf("exclusive ENIs left after release: %v", n)
	}
	if raw, _ := st.LoadKind(string(KindENI)); len(raw) != 0 {
		t.Fatalf("store keeps %d exclusive records after release", len(raw))
	}
	if c := x.Capacity(); c.Capacity != 1 || c.InUse != 0 {
		t.Fatalf("after release: %+v", c)
	}
}

// frozenCloud stands for a killed process: once frozen, every call waits for the end of the
// test and fails, so nothing after the "kill" reaches the cloud.
type frozenCloud struct {
	aliyun.Cloud
	mu     sync.Mutex
	frozen bool
	dead   chan struct{}
}

func (f *frozenCloud) check() error {
	f.mu.Lock()
	fr := f.frozen
	f.mu.Unlock()
	if fr {
		<-f.dead
		return errors.New("process killed")
	}
	return nil
}
func (f *frozenCloud) freeze() { f.mu.Lock(); f.frozen = true; f.mu.Unlock() }

func (f *frozenCloud) CreateENI(ctx context.Context, r aliyun.CreateENIRequest) (aliyun.ENI, error) {
	if err := f.check(); err != nil {
		return aliyun.ENI{}, err
	}
	return f.Cloud.CreateENI(ctx, r)
}
func (f *frozenCloud) AttachENI(ctx context.Context, id, inst string) (aliyun.ENI, error) {
	if err := f.check(); err != nil {
		return aliyun.ENI{}, err
	}
	return f.Cloud.AttachENI(ctx, id, inst)
}
func (f *frozenCloud) DetachENI(ctx context.Context, id, inst string) error {
	if err := f.check(); err != nil {
		return err
	}
	return f.Cloud.DetachENI(ctx, id, inst)
}
func (f *frozenCloud) DeleteENI(ctx context.Context, id string) error {
	if err := f.check(); err != nil {
		return err
	}
	return f.Cloud.DeleteENI(ctx, id)
}

// TestExclusiveENICrashDuringAddLeavesNoENI: the agent dies (its calls stop, its store closes)
// while the cloud holds the reply of CreateNetworkInterface (the ENI exists, the store does not
// know its ID) or of AttachNetworkInterface (the ENI is attached, the store says attaching).
// A restarted agent finds the record and removes the ENI: nothing is left in the cloud.
func TestExclusiveENICrashDuringAddLeavesNoENI(t *testing.T) {
	for _, action := range []string{"CreateNetworkInterface", "AttachNetworkInterface"} {
		t.Run(action, func(t *testing.T) {
			e := newEnv(t)
			cfg := eniConf(t, 0, 0, "vsw-test-a")
			fc := &frozenCloud{Cloud: e.client(), dead: make(chan struct{})}
			node, _, st := e.startNode(smallNode, cfg, fc)
			held, release := e.emu.HoldReply(action, nil)
			defer release()
			errc, addDone := make(chan error, 1), make(chan struct{})
			// The killed process's goroutines end with the test, not after it: its frozen
			// calls fail, its ADD returns and its maintenance loop stops. (Left running, the
			// loop's first round, ~30 s on, logged through this test's logger after the test
			// had ended, and that panics the test binary.)
			defer func() {
				close(fc.dead)
				release()
				<-addDone
				node.Stop()
			}()
			go func() {
				defer close(addDone)
				_, err := node.AllocateFor(context.Background(), Request{Key: PodKey{Namespace: "default", Name: "ex", ContainerID: "c1"}, Kind: KindENI})
				errc <- err
			}()
			select {
			case <-held:
			case err := <-errc:
				t.Fatalf("ADD finished before the held reply: %v", err)
			case <-time.After(20 * time.Second):
				t.Fatal("the held call never came")
			}
			// kill -9: no call after this point reaches the cloud, the store is closed as the
			// process's file would be.
			fc.freeze()
			if err := st.Close(); err != nil {
				t.Fatal(err)
			}
			release()
			if n := len(exclusiveENIs(e.emu.Snapshot())); n != 1 {
				t.Fatalf("%d exclusive ENIs at the crash, want 1 (the held call took effect)", n)
			}

			node2, x2, st2 := e.startNode(smallNode, cfg, nil)
			defer st2.Close()
			defer node2.Stop()
			if n := exclusiveENIs(e.emu.Snapshot()); len(n) != 0 {
				t.Fatalf("after restart the cloud still has exclusive ENIs %v", n)
			}
			if raw, _ := st2.LoadKind(string(KindENI)); len(raw) != 0 {
				t.Fatalf("after restart the store keeps %d exclusive records", len(raw))
			}
			// The node serves exclusive pods again, with its full quota.
			if c := x2.Capacity(); c.Capacity != 2 {
				t.Fatalf("capacity after recovery %+v, want 2", c)
			}
			al, err := node2.AllocateFor(context.Background(), Request{Key: PodKey{Namespace: "default", Name: "ex", ContainerID: "c2"}, Kind: KindENI})
			if err != nil {
				t.Fatal(err)
			}
			if err := node2.Release(context.Background(), PodKey{Namespace: "default", Name: "ex", ContainerID: "c2"}); err != nil {
				t.Fatal(err)
			}
			if n := exclusiveENIs(e.emu.Snapshot()); len(n) != 0 {
				t.Fatalf("ENI %s not deleted: %v", al.ENI.ID, n)
			}
		})
	}
}

// TestExclusiveENIFaultsNoLeakNoDoubleAddress: with 30 % Throttling/InternalError and latency,
// a burst of exclusive pods on an ecs.g7.4xlarge, retried with a new sandbox as the kubelet
// does, each ends with its own ENI and address; after release and GC the cloud has none.
func TestExclusiveENIFaultsNoLeakNoDoubleAddress(t *testing.T) {
	e := newEnv(t, ecsemu.WithSeed(7))
	e.grace = 50 * time.Millisecond
	node, x, st := e.startNode(bigNode, eniConf(t, 0, 0, "vsw-test-a"), nil)
	defer st.Close()
	defer node.Stop()
	e.emu.SetLatency(20 * time.Millisecond)
	e.emu.InjectFault(ecsemu.Fault{Code: ecsemu.CodeThrottling, Rate: 0.15})
	e.emu.InjectFault(ecsemu.Fault{Code: ecsemu.CodeInternalError, Rate: 0.15})

	const pods = 5
	var mu sync.Mutex
	got := map[string]Allocation{}
	var wg sync.WaitGroup
	for i := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for attempt := 0; attempt < 30; attempt++ {
				key := PodKey{Namespace: "default", Name: fmt.Sprintf("ex-%d", i), ContainerID: fmt.Sprintf("c%d-%d", i, attempt)}
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				al, err := node.AllocateFor(ctx, Request{Key: key, Kind: KindENI})
				cancel()
				if err == nil {
					mu.Lock()
					got[key.key()] = al
					mu.Unlock()
					return
				}
				t.Logf("ADD %s: %v (retrying with a new sandbox)", key, err)
				// The kubelet deletes a failed sandbox before the next one.
				if err := node.Release(context.Background(), key); err != nil {
					t.Errorf("DEL %s: %v", key, err)
				}
			}
			t.Errorf("pod ex-%d never got an ENI", i)
		}()
	}
	wg.Wait()
	if len(got) != pods {
		t.Fatalf("%d of %d pods have an ENI", len(got), pods)
	}
	ips, enis := map[netip.Addr]string{}, map[string]string{}
	for k, al := range got {
		if o, dup := ips[al.IP]; dup {
			t.Fatalf("address %s given to %s and %s", al.IP, o, k)
		}
		if o, dup := enis[al.ENI.ID]; dup {
			t.Fatalf("ENI %s given to %s and %s", al.ENI.ID, o, k)
		}
		ips[al.IP], enis[al.ENI.ID] = k, k
	}
	for _, al := range node.Allocations() {
		if al.Kind != KindENI {
			t.Fatalf("unexpected allocation %+v", al)
		}
	}
	for k := range got {
		var key PodKey
		for pk := range node.Allocations() {
			if pk.key() == k {
				key = pk
			}
		}
		if err := node.Release(context.Background(), key); err != nil {
			t.Fatal(err)
		}
	}
	snap := e.emu.Snapshot()
	if snap.Errors[ecsemu.CodeThrottling]+snap.Errors[ecsemu.CodeInternalError] < 3 {
		t.Fatalf("faults barely fired (%v): the test proves nothing", snap.Errors)
	}
	t.Logf("calls %v errors %v", snap.Calls, snap.Errors)
	e.emu.ClearFaults()
	e.emu.SetLatency(0)
	// Whatever a failed call left behind, GC (twice, a grace apart) removes it.
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := node.GC(context.Background(), func() map[string]bool { return map[string]bool{} }); err != nil {
			t.Logf("GC: %v", err)
		}
		left := exclusiveENIs(e.emu.Snapshot())
		raw, _ := st.LoadKind(string(KindENI))
		if len(left) == 0 && len(raw) == 0 && x.ENIsHeld() == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("leaked: cloud %v, store %d records", left, len(raw))
		}
		time.Sleep(60 * time.Millisecond)
	}
}
