//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/test/lab"
)

// addPods adds n pods round-robin over the lab's nodes, concurrently, named pod-<from+i>.
func addPods(t *testing.T, l *lab.Lab, ctx context.Context, from, n int) []*lab.Pod {
	t.Helper()
	pods := make([]*lab.Pod, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pods[i], errs[i] = l.AddPod(ctx, (from+i)%len(l.Nodes()), "default", fmt.Sprintf("pod-%d", from+i))
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("add pod-%d: %v", from+i, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return pods
}

func linkPins(t *testing.T, n *lab.Node) int {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(n.PinRoot(), "links"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return len(ents)
}

func TestThirtyPodsAcrossTwoNodes(t *testing.T) {
	const minPool, maxPool = 2, 6
	l := up(t, lab.Options{Nodes: 2, ENIConf: lab.ENIConf{MinPoolSize: minPool, MaxPoolSize: maxPool}})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	for _, n := range l.Nodes() {
		if err := n.Status(ctx); err != nil {
			t.Fatalf("CNI STATUS on %s: %v", n.Name, err)
		}
	}
	pods := addPods(t, l, ctx, 0, 30)

	// Distinct addresses, each an IP (secondary, or a secondary ENI's primary) of an ENI
	// attached to the pod's node.
	snap := l.Emulator().Snapshot()
	owner := map[string]string{} // IP → instance
	primary := map[string]bool{} // secondary ENIs' primary addresses
	for _, e := range snap.ENIs {
		if e.Status != "InUse" {
			continue
		}
		for _, ip := range e.IPs {
			owner[ip] = e.InstanceID
		}
		if e.Tags[ipam.TagCreator] == ipam.TagCreatorTern {
			primary[e.PrimaryIP] = true
		}
	}
	onPrimary := 0
	for _, p := range pods {
		if primary[p.IP.String()] {
			onPrimary++
		}
	}
	// The pool hands out an ENI's primary address too; the traffic checks below must cover
	// such a pod (its address must not be local to the node).
	if onPrimary == 0 {
		t.Errorf("no pod got a secondary ENI's primary address; the test cannot show they are reachable")
	}
	seen := map[netip.Addr]string{}
	for _, p := range pods {
		if prev, dup := seen[p.IP]; dup {
			t.Fatalf("%s and %s both got %s", prev, p.Key(), p.IP)
		}
		seen[p.IP] = p.Key()
		if owner[p.IP.String()] != p.Node.InstanceID {
			t.Errorf("%s on %s got %s, which the cloud assigns to %q", p.Key(), p.Node.Name, p.IP, owner[p.IP.String()])
		}
		if err := l.Check(ctx, p); err != nil {
			t.Errorf("CNI CHECK of %s: %v", p.Key(), err)
		}
	}
	settled(t, l, ctx) // background refill may still be assigning addresses
	// The agent attached the pod programs with tcx: one pinned link per direction and pod.
	perNode := map[*lab.Node]int{}
	for _, p := range pods {
		perNode[p.Node]++
	}
	for n, want := range perNode {
		if got := linkPins(t, n); got != 2*want {
			t.Errorf("%s has %d tcx link pins for %d pods, want %d", n.Name, got, want, 2*want)
		}
	}
	// Each node's endpoint registry holds exactly its pods, and its ipcache marks them local.
	for _, n := range l.Nodes() {
		want := map[netip.Addr]bool{}
		for _, p := range pods {
			if p.Node == n {
				want[p.IP] = true
			}
		}
		if got := endpointAddrs(t, n); len(got) != len(want) {
			t.Errorf("%s's endpoint registry holds %v, want its %d pods", n.Name, got, len(want))
		} else {
			for a := range got {
				if !want[a] {
					t.Errorf("%s's endpoint registry holds %s, not one of its pods", n.Name, a)
				}
			}
		}
	}

	// Same-node and cross-node TCP: every pod serves; pairs talk in both directions.
	for _, p := range pods {
		s, err := p.Serve(8080)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
	}
	var sameNode, crossNode int
	for i, src := range pods {
		for _, dst := range []*lab.Pod{pods[(i+1)%len(pods)], pods[(i+2)%len(pods)]} {
			got, err := src.Ask(ctx, netip.AddrPortFrom(dst.IP, 8080).String(), "hello from "+src.Key())
			if err != nil {
				t.Fatalf("%s (%s, %s) → %s (%s, %s): %v", src.Key(), src.IP, src.Node.Name, dst.Key(), dst.IP, dst.Node.Name, err)
			}
			if got != dst.Key() {
				t.Fatalf("%s → %s answered as %q", src.Key(), dst.Key(), got)
			}
			if src.Node == dst.Node {
				sameNode++
			} else {
				crossNode++
			}
		}
	}
	if sameNode == 0 || crossNode == 0 {
		t.Fatalf("pairs tested: %d same-node, %d cross-node; want both", sameNode, crossNode)
	}
	t.Logf("TCP ok for %d same-node and %d cross-node pairs", sameNode, crossNode)

	// DEL returns addresses to the pool. A repeated DEL is harmless, and so is a DEL whose pod
	// namespace is already gone (pods[1]: destroyed first, taking its veth pair with it).
	l.Forget(pods[1])
	for _, p := range pods {
		if err := l.DeletePod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.DeletePod(ctx, pods[0]); err != nil {
		t.Fatalf("second DEL of %s: %v", pods[0].Key(), err)
	}
	for _, n := range l.Nodes() {
		// pods[1]'s veth went with its namespace before DEL, so its pins (and its endpoint
		// record) stay until GC, the agent's next start, or Down.
		if got := linkPins(t, n); got > 2 {
			t.Errorf("%s still has %d tcx link pins after every DEL", n.Name, got)
		}
		if got := endpointAddrs(t, n); len(got) > 1 {
			t.Errorf("%s's endpoint registry still holds %v after every DEL", n.Name, got)
		}
	}
	for _, n := range l.Nodes() {
		st, err := n.Client().State(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Allocations) != 0 || st.InUse != 0 {
			t.Errorf("%s still has allocations after DEL: %+v", n.Name, st.Allocations)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ok := true
		var states []string
		for _, n := range l.Nodes() {
			st, err := n.Client().State(ctx)
			if err != nil {
				t.Fatal(err)
			}
			states = append(states, fmt.Sprintf("%s idle=%d", n.Name, st.Idle))
			ok = ok && st.Idle >= minPool && st.Idle <= maxPool
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pool not within [%d,%d] 30s after releasing every pod: %v", minPool, maxPool, states)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// An emptied ENI may still be detaching in the background: wait for the two to agree.
	settled(t, l, ctx)
}

// endpointAddrs reads a node's pinned endpoint registry: pod address → whether the ipcache
// marks it local too, and with a MAC recorded.
func endpointAddrs(t *testing.T, n *lab.Node) map[netip.Addr]bool {
	t.Helper()
	m, err := loader.OpenPinnedMaps(n.PinRoot())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	eps, err := m.DumpEndpoints()
	if err != nil {
		t.Fatal(err)
	}
	out := map[netip.Addr]bool{}
	for _, v := range eps {
		a := loader.BEToAddr(v.Addr)
		var c loader.IPCacheValue
		err := m.IPCache.Lookup(loader.IPCacheKey{Prefixlen: 32, Addr: v.Addr}, &c)
		if err != nil || c.Flags&loader.IPCacheFlagLocal == 0 || v.Mac == ([6]byte{}) {
			t.Errorf("%s: endpoint %s has ipcache %+v (%v), MAC %x", n.Name, a, c, err, v.Mac)
		}
		out[a] = true
	}
	return out
}
