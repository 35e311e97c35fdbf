//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/test/lab"
)

// TestStoreDeletedUnderLivePodsKeepsTheirAddresses: the IPAM store is deleted while the node's
// pods run (an operator's rm, a state directory on a new volume) and the agent restarts. The
// real agent recovers the node's ENIs from the cloud and, from the sandbox table and the pinned
// endpoint registry, each live pod's allocation; the node is then filled with new pods, none
// of which gets a live pod's address; the live pods' DEL releases their addresses.
func TestStoreDeletedUnderLivePodsKeepsTheirAddresses(t *testing.T) {
	t.Run("store", func(t *testing.T) { storeLoss(t, false) })
	// The whole state directory (a volume mounted anew): the sandbox table goes too, and the
	// pinned endpoint registry alone knows the live pods, by address. Their recovered
	// allocations name no sandbox, so their DEL does not match them; the GC after it does.
	t.Run("state-dir", func(t *testing.T) { storeLoss(t, true) })
}

func storeLoss(t *testing.T, sandboxTableToo bool) {
	l := up(t, lab.Options{Nodes: 1, InstanceType: "ecs.g7.large"}) // 2 ENIs × 6: 12 pods
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	n := l.Node(0)
	live := addPods(t, l, ctx, 0, 5)
	holder := map[netip.Addr]string{}
	for _, p := range live {
		holder[p.IP] = p.Key()
	}

	if err := n.KillAgent(); err != nil {
		t.Fatal(err)
	}
	store := filepath.Join(filepath.Dir(n.AgentLog()), "ipam.db")
	if err := os.Remove(store); err != nil {
		t.Fatal(err)
	}
	if sandboxTableToo {
		if err := os.Remove(filepath.Join(filepath.Dir(store), "sandboxes.json")); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := n.Client().State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	byIP := map[string]string{}
	for k, al := range st.Allocations {
		byIP[al.IP] = k
	}
	for _, p := range live {
		want := p.Key() + "/" + p.ContainerID
		if sandboxTableToo {
			want = "tern-recovered/ifindex-" // + the host veth's ifindex
		}
		if k, ok := byIP[p.IP.String()]; !ok || !strings.HasPrefix(k, want) {
			t.Errorf("after the store was deleted: live pod %s's address %s is allocated to %q (%v), want %s…", p.Key(), p.IP, k, ok, want)
		}
	}
	if len(st.Allocations) != len(live) {
		t.Errorf("after the store was deleted: %d allocations, want the %d live pods'", len(st.Allocations), len(live))
	}
	if t.Failed() {
		t.FailNow()
	}

	// Fill the node; every new pod gets an address no live pod holds.
	var added int
	for i := 100; ; i++ {
		p, err := l.AddPod(ctx, 0, "default", fmt.Sprintf("new-%d", i))
		if err != nil {
			if !strings.Contains(err.Error(), "node is at its ENIIP capacity") {
				t.Fatalf("ADD of new-%d: %v (want success or node full)", i, err)
			}
			t.Logf("node full after %d new pods: %v", added, err)
			break
		}
		if h, ok := holder[p.IP]; ok {
			t.Fatalf("new pod new-%d got %s, which live pod %s holds", i, p.IP, h)
		}
		holder[p.IP] = p.Key()
		added++
		if added > 20 {
			t.Fatal("more than 20 new pods on a node of 12")
		}
	}
	if added != 12-len(live) {
		t.Errorf("%d new pods fit beside %d live ones on a node of 12, want %d", added, len(live), 12-len(live))
	}
	// CHECK names the sandbox: only the sandbox table's recovered allocations carry its ID.
	for _, p := range live {
		if sandboxTableToo {
			break
		}
		if err := l.Check(ctx, p); err != nil {
			t.Errorf("CNI CHECK of live pod %s after the restart: %v", p.Key(), err)
		}
	}

	// A live pod's DEL (and, without the sandbox's ID, the GC after it) releases its
	// recovered allocation.
	if err := l.DeletePod(ctx, live[0]); err != nil {
		t.Fatal(err)
	}
	if sandboxTableToo {
		if err := l.GC(ctx); err != nil {
			t.Fatal(err)
		}
	}
	st, err = n.Client().State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for k, al := range st.Allocations {
		if al.IP == live[0].IP.String() {
			t.Fatalf("%s's address %s is still allocated (%s) after its DEL", live[0].Key(), live[0].IP, k)
		}
	}
	if len(st.Allocations) != 11 {
		t.Errorf("%d allocations after the DEL, want 11 (4 live, 7 new): GC released a live one", len(st.Allocations))
	}
	p, err := l.AddPod(ctx, 0, "default", "after-del")
	if err != nil {
		t.Fatalf("ADD after a live pod's DEL on a full node: %v", err)
	}
	if p.IP != live[0].IP {
		t.Errorf("the pod after %s's DEL got %s, want its freed %s", live[0].Key(), p.IP, live[0].IP)
	}
}

// TestStoreAndPinsLostUnderLivePodsAsksTheAPIServer: the store, the sandbox table and the
// datapath's pins are all gone while the pods run: only the apiserver still says which pods
// live on the node, with their status.podIPs. The restarted agent recovers their allocations
// from it, fills the node with new pods on other addresses, and a live pod deleted (Pod
// object, then DEL) has its address freed by the CNI GC after it.
func TestStoreAndPinsLostUnderLivePodsAsksTheAPIServer(t *testing.T) {
	l := upKubernetes(t, lab.Options{Nodes: 1, InstanceType: "ecs.g7.large"}) // 12 pods
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	n := l.Node(0)
	var live []*lab.Pod
	for i := range 4 {
		p, err := l.RunPod(ctx, lab.PodSpec{Name: fmt.Sprintf("live-%d", i), Node: n.Name})
		if err != nil {
			t.Fatal(err)
		}
		live = append(live, p)
	}
	holder := map[netip.Addr]string{}
	for _, p := range live {
		holder[p.IP] = p.Key()
	}
	if err := n.KillAgent(); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(n.AgentLog())
	for _, f := range []string{"ipam.db", "sandboxes.json"} {
		if err := os.Remove(filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
	if err := loader.RemovePins(n.PinRoot()); err != nil {
		t.Fatal(err)
	}
	if err := n.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := n.Client().State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range live {
		k := p.Key() + "/" + ipam.RecoveredContainerID
		if al, ok := st.Allocations[k]; !ok || al.IP != p.IP.String() {
			t.Errorf("live pod %s (%s): allocation %s is %+v (%v), want its address recovered from the apiserver", p.Key(), p.IP, k, al, ok)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	added := 0
	for i := 0; ; i++ {
		p, err := l.AddPod(ctx, 0, "default", fmt.Sprintf("new-%d", i))
		if err != nil {
			if !strings.Contains(err.Error(), "node is at its ENIIP capacity") {
				t.Fatalf("ADD of new-%d: %v (want success or node full)", i, err)
			}
			break
		}
		if h, ok := holder[p.IP]; ok {
			t.Fatalf("new pod new-%d got %s, which live pod %s holds", i, p.IP, h)
		}
		holder[p.IP] = p.Key()
		if added++; added > 20 {
			t.Fatal("more than 20 new pods on a node of 12")
		}
	}
	if added != 12-len(live) {
		t.Errorf("%d new pods fit beside %d live ones on a node of 12, want %d", added, len(live), 12-len(live))
	}
	// A CNI GC keeps them (the apiserver shows each pod with its address) ...
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err = n.Client().State(ctx); err != nil || len(st.Allocations) != 12 {
		t.Fatalf("after a CNI GC: %d allocations (%v), want 12: GC released a live pod's", len(st.Allocations), err)
	}
	// ... until the pod is gone.
	if err := l.DeletePod(ctx, live[0]); err != nil {
		t.Fatal(err)
	}
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err = n.Client().State(ctx); err != nil || len(st.Allocations) != 11 {
		t.Fatalf("after %s was deleted and a CNI GC: %d allocations (%v), want 11", live[0].Key(), len(st.Allocations), err)
	}
	p, err := l.AddPod(ctx, 0, "default", "after-del")
	if err != nil {
		t.Fatalf("ADD after a live pod's deletion on a full node: %v", err)
	}
	if p.IP != live[0].IP {
		t.Errorf("the pod after %s's deletion got %s, want its freed %s", live[0].Key(), p.IP, live[0].IP)
	}
}
