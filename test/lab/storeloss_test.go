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

	"github.com/tern-net/tern/test/lab"
)

// TestStoreDeletedUnderLivePodsKeepsTheirAddresses: the IPAM store is deleted while the node's
// pods run (an operator's rm, a state directory on a new volume) and the agent restarts. The
// real agent recovers the node's ENIs from the cloud and, from the sandbox table and the pinned
// endpoint registry, each live pod's allocation; the node is then filled with new pods, none
// of which gets a live pod's address; the live pods' DEL releases their addresses.
func TestStoreDeletedUnderLivePodsKeepsTheirAddresses(t *testing.T) {
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
	if err := n.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := n.Client().State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range live {
		al, ok := st.Allocations[p.Key()+"/"+p.ContainerID]
		if !ok || al.IP != p.IP.String() {
			t.Errorf("after the store was deleted: live pod %s (%s) has allocation %+v (%v), want its own address", p.Key(), p.IP, al, ok)
		}
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
	for _, p := range live {
		if err := l.Check(ctx, p); err != nil {
			t.Errorf("CNI CHECK of live pod %s after the restart: %v", p.Key(), err)
		}
	}

	// A live pod's DEL releases its recovered allocation.
	if err := l.DeletePod(ctx, live[0]); err != nil {
		t.Fatal(err)
	}
	st, err = n.Client().State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := st.Allocations[live[0].Key()+"/"+live[0].ContainerID]; ok {
		t.Fatalf("%s's allocation is still there after its DEL", live[0].Key())
	}
	p, err := l.AddPod(ctx, 0, "default", "after-del")
	if err != nil {
		t.Fatalf("ADD after a live pod's DEL on a full node: %v", err)
	}
	if p.IP != live[0].IP {
		t.Errorf("the pod after %s's DEL got %s, want its freed %s", live[0].Key(), p.IP, live[0].IP)
	}
}
