//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/tern-net/tern/internal/nsutil"
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

// linkPins counts the pod programs' tcx link pins (if<N>_<dir>); the netdev programs'
// (netdev_if<N>_<dir>) are checked by checkNetdevAttached.
func linkPins(t *testing.T, n *lab.Node) int {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(n.PinRoot(), "links"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	pins := 0
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "if") {
			pins++
		}
	}
	return pins
}

// checkNetdevAttached asserts that the node's primary NIC (eth0) and every ENI carrying a
// pod have the netdev programs attached: a tcx link pinned as links/netdev_if<N>_<dir>
// that is live on that interface and runs tern_from_netdev / tern_to_netdev.
func checkNetdevAttached(t *testing.T, ctx context.Context, n *lab.Node) {
	t.Helper()
	st, err := n.Client().State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{} // MAC → what it is
	for _, e := range st.ENIs {
		if len(e.InUse) > 0 {
			want[e.MAC] = "ENI " + e.ID
		}
	}
	if len(want) == 0 {
		t.Fatalf("%s: no ENI carries a pod", n.Name)
	}
	ifindex := map[string]int{} // name or MAC → ifindex in the node namespace
	err = nsutil.Do(n.NS, func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, l := range links {
			ifindex[l.Attrs().HardwareAddr.String()] = l.Attrs().Index
			ifindex[l.Attrs().Name] = l.Attrs().Index
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want["eth0"] = "primary NIC"
	for key, what := range want {
		idx, ok := ifindex[key]
		if !ok {
			t.Errorf("%s: %s (%s) has no link in the node namespace", n.Name, what, key)
			continue
		}
		for dir, prog := range map[string]string{"ingress": "tern_from_netdev", "egress": "tern_to_netdev"} {
			pin := filepath.Join(n.PinRoot(), "links", fmt.Sprintf("netdev_if%d_%s", idx, dir))
			l, err := link.LoadPinnedLink(pin, nil)
			if err != nil {
				t.Errorf("%s: %s (ifindex %d) has no netdev %s link: %v", n.Name, what, idx, dir, err)
				continue
			}
			info, err := l.Info()
			l.Close()
			if err != nil {
				t.Fatal(err)
			}
			if tcx := info.TCX(); tcx == nil || int(tcx.Ifindex) != idx {
				t.Errorf("%s: netdev %s link of %s is not live on ifindex %d: %+v", n.Name, dir, what, idx, info.TCX())
				continue
			}
			p, err := ebpf.NewProgramFromID(info.Program)
			if err != nil {
				t.Fatal(err)
			}
			pi, err := p.Info()
			p.Close()
			if err != nil {
				t.Fatal(err)
			}
			// The kernel keeps 15 characters of a program's name.
			if !strings.HasPrefix(prog, pi.Name) || pi.Name == "" {
				t.Errorf("%s: %s %s runs %q, want %s", n.Name, what, dir, pi.Name, prog)
			}
		}
	}
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
	// The netdev programs are on every node's primary NIC and every ENI its pods use.
	for _, n := range l.Nodes() {
		checkNetdevAttached(t, ctx, n)
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
	// ENIs the pool detached took their netdev tcx links with them; after a GC their pins
	// are gone too. The pool may not have detached any here, so one is made: a link with a
	// pinned tcx link under the netdev name, then deleted.
	stalePin := pinLinkThenDeleteIt(t, l.Node(0))
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	for _, n := range l.Nodes() {
		if stale := staleNetdevPins(t, n); len(stale) > 0 {
			t.Errorf("%s keeps netdev link pins of interfaces that are gone after GC: %v", n.Name, stale)
		}
	}
	if _, err := os.Stat(stalePin); !os.IsNotExist(err) {
		t.Errorf("GC left the netdev pin %s of a deleted link (stat: %v)", stalePin, err)
	}
}

// pinLinkThenDeleteIt adds a veth to the node, attaches a no-op program with tcx, pins the
// link where the agent pins netdev links, and deletes the veth: the pin an ENI
// leaves when the pool detaches it. Returns the pin's path.
func pinLinkThenDeleteIt(t *testing.T, n *lab.Node) string {
	t.Helper()
	spec, err := loader.LoadNoop()
	if err != nil {
		t.Fatal(err)
	}
	prog, err := ebpf.NewProgram(spec.Programs[loader.NoopProgTernNoop])
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	var pin string
	err = nsutil.Do(n.NS, func() error {
		d := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eni-gone"}, PeerName: "eni-gone-peer"}
		if err := netlink.LinkAdd(d); err != nil {
			return fmt.Errorf("add veth: %w", err)
		}
		defer netlink.LinkDel(d)
		dl, err := netlink.LinkByName(d.Name)
		if err != nil {
			return err
		}
		idx := dl.Attrs().Index
		l, err := link.AttachTCX(link.TCXOptions{Interface: idx, Program: prog, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return fmt.Errorf("tcx attach to ifindex %d: %w", idx, err)
		}
		defer l.Close()
		pin = filepath.Join(n.PinRoot(), "links", fmt.Sprintf("netdev_if%d_ingress", idx))
		if err := l.Pin(pin); err != nil {
			return fmt.Errorf("pin %s: %w", pin, err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("make a stale netdev pin on %s: %v", n.Name, err)
	}
	t.Cleanup(func() { os.Remove(pin) })
	return pin
}

// staleNetdevPins lists the netdev link pins of a node whose interface no longer exists in
// its namespace, and logs how many pins it checked.
func staleNetdevPins(t *testing.T, n *lab.Node) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(n.PinRoot(), "links"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var stale []string
	checked := 0
	err = nsutil.Do(n.NS, func() error {
		for _, e := range ents {
			var idx int
			var dir string
			if _, err := fmt.Sscanf(strings.ReplaceAll(e.Name(), "_", " "), "netdev if%d %s", &idx, &dir); err != nil {
				continue
			}
			checked++
			if _, err := netlink.LinkByIndex(idx); err != nil {
				stale = append(stale, e.Name())
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: %d netdev link pins, %d of them stale", n.Name, checked, len(stale))
	return stale
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
