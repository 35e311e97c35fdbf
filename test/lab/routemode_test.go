//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/ipam/nodereport"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/lab"
)

// eniActions are the cloud calls the ENIIP mode makes per pod; the route mode makes none.
var eniActions = []string{"CreateNetworkInterface", "AttachNetworkInterface", "AssignPrivateIpAddresses",
	"UnassignPrivateIpAddresses", "DetachNetworkInterface", "DeleteNetworkInterface"}

// routeTable is the emulator's route table as destination → next hop (every status).
func routeTable(s ecsemu.State) map[string]string {
	out := map[string]string{}
	for _, r := range s.Routes {
		out[r.Destination] = r.NextHopID + "/" + r.Status
	}
	return out
}

// TestVPCRouteModeAcrossNodes: two nodes in the VPC route mode (daemonMode "VPC"). Each agent
// routes its Node's pod CIDR through one VPC route entry; pods get addresses of their node's
// CIDR with no cloud call; a pod reaches a pod of the other node directly (through the
// emulator's VPC router, following the route entry) and through a ClusterIP; DEL and GC leave
// no allocation; a deleted Node's entry is removed by the other node's agent and the route
// table ends exactly as expected. The cloud's listings lag throughout (lab.LaggingListing: the
// route entry listing 1 s behind the table).
func TestVPCRouteModeAcrossNodes(t *testing.T) {
	l := upKubernetes(t, lab.Options{Nodes: 2, DaemonMode: agent.ModeVPC, ListingLag: lab.LaggingListing})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	emu, c := l.Emulator(), l.Client()
	settled(t, l, ctx)
	before := emu.Snapshot()
	// The Node report: no ENI annotation (no ENI holds pod addresses), the pod CIDR's capacity.
	for i := range 2 {
		n := l.Node(i)
		want := strconv.Itoa(1<<(32-lab.RoutePodCIDR(i).Bits()) - 2)
		for {
			node, err := c.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			eniips, hasENIIPs := node.Annotations[nodereport.AnnotationAllocatedENIIPs]
			if got := node.Annotations[nodereport.AnnotationMaxAvailableIP]; got == want && !hasENIIPs {
				break
			} else if ctx.Err() != nil {
				t.Fatalf("Node %s: max-available-ip %q (want %s), allocated-eniips %q (want none)", n.Name, got, want, eniips)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	const ns = "route"
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("http"), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var pods []*lab.Pod
	for i := range 2 {
		p, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: fmt.Sprintf("web-%d", i), Node: l.Node(i).Name,
			Labels: map[string]string{"app": "web"}, HTTPPort: 8080})
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, p)
	}
	client, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "client", Node: l.Node(0).Name})
	if err != nil {
		t.Fatal(err)
	}
	pods = append(pods, client)
	for _, p := range pods {
		if cidr := lab.RoutePodCIDR(p.Node.Index); !cidr.Contains(p.IP) {
			t.Fatalf("%s on %s has %s, outside the node's pod CIDR %s", p.Key(), p.Node.Name, p.IP, cidr)
		}
	}
	// Across nodes, pod to pod: client (node-1) → web-1 (node-2) by its address.
	body, err := client.HTTPGet(ctx, fmt.Sprintf("http://%s:8080/", pods[1].IP))
	if err != nil || !strings.Contains(body, "web-1") {
		t.Fatalf("client → web-1 (%s, the other node) directly: %q, %v", pods[1].IP, body, err)
	}
	// And through the ClusterIP until both backends answered.
	seen := map[string]bool{}
	deadline := time.Now().Add(30 * time.Second)
	for len(seen) < 2 {
		body, err := client.HTTPGet(ctx, "http://"+svc.Spec.ClusterIP+":80/")
		if err == nil {
			name := strings.Fields(body + " x x")[2]
			if name != "web-0" && name != "web-1" {
				t.Fatalf("answer %q through the ClusterIP from a pod that is not a backend", body)
			}
			seen[name] = true
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 30s only %v answered through %s (last error %v)", seen, svc.Spec.ClusterIP, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	after := emu.Snapshot()
	calls := 0
	for _, a := range append(eniActions, "CreateRouteEntry", "DeleteRouteEntry") {
		calls += after.Calls[a] - before.Calls[a]
	}
	t.Logf("cloud API calls that change state for %d pods: %d (route mode: none per pod)", len(pods), calls)
	if calls != 0 {
		t.Fatalf("pod ADDs in route mode changed cloud state %d times: %v → %v", calls, before.Calls, after.Calls)
	}

	// DEL of every pod, then GC: nothing held, the route table as at the start.
	for _, p := range pods {
		if err := l.DeletePod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if got := agentAllocations(t, l, ctx); len(got) != 0 {
		t.Fatalf("allocations left after DEL and GC: %v", got)
	}
	settled(t, l, ctx)
	if got, want := routeTable(emu.Snapshot()), routeTable(before); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("route table after DEL and GC %v, want the start's %v", got, want)
	}

	// node-2 leaves the cluster: its agent stops (its instance is going away) and its Node is
	// deleted. node-1's agent, first by name, deletes node-2's entry; its own stays.
	gone := l.Node(1)
	if err := gone.StopAgent(); err != nil {
		t.Fatal(err)
	}
	if err := c.CoreV1().Nodes().Delete(ctx, gone.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{lab.RoutePodCIDR(0).String(): l.Node(0).InstanceID + "/" + ecsemu.RouteStatusAvailable}
	for {
		got := routeTable(emu.Snapshot())
		if fmt.Sprint(got) == fmt.Sprint(want) {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("route table %v after node-2's Node was deleted, want %v", got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestVPCRouteModeFaultsAndKillDuringBurst: pods churn on two route-mode nodes while 30 % of
// the cloud calls fail (Throttling, InternalError), every call takes 20 ms more and the
// listings lag (lab.LaggingListing: the route entry listing 1 s behind), and the agents are
// killed with SIGKILL and restarted: at random moments, and while a CreateRouteEntry reply is
// held back (the node's entry was deleted behind its back — the restarted agent still sees it
// listed, then its check creates it again — and dies waiting for the reply, so the next start
// replays the create before the listing shows the entry). No address is given twice, no live
// pod loses its address, GC leaves exactly the live pods, and the route table holds exactly
// one Available entry per node.
func TestVPCRouteModeFaultsAndKillDuringBurst(t *testing.T) {
	l := up(t, lab.Options{Nodes: 2, DaemonMode: agent.ModeVPC, Seed: 11, Latency: 20 * time.Millisecond,
		AllocateWait: 200 * time.Millisecond, ListingLag: lab.LaggingListing,
		Faults: []ecsemu.Fault{{Code: ecsemu.CodeThrottling, Rate: 0.15}, {Code: ecsemu.CodeInternalError, Rate: 0.15}}})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	emu := l.Emulator()

	churners := startBurst(ctx, l, 2, 12)
	kills, heldKills := 0, 0
	for i := range 8 {
		n := l.Node(rand.IntN(2))
		if i%4 == 3 {
			// The route entry vanishes; the next start creates it again, and the agent dies
			// with that create's reply held back.
			held, release := emu.HoldReply("CreateRouteEntry", func(h ecsemu.HeldCall) bool { return h.NextHopID == n.InstanceID })
			if err := n.KillAgent(); err != nil {
				t.Fatal(err)
			}
			deleteRouteOf(t, ctx, emu, n.InstanceID)
			exited, err := n.LaunchAgent()
			if err != nil {
				t.Fatal(err)
			}
			select {
			case <-held:
				heldKills++
			case <-exited:
				t.Fatalf("the agent of %s exited during start-up; see %s", n.Name, n.AgentLog())
			case <-time.After(30 * time.Second):
				t.Fatalf("the restarted agent of %s never created its route entry again", n.Name)
			}
			if err := n.KillAgent(); err != nil {
				t.Fatal(err)
			}
			release()
		} else {
			time.Sleep(time.Duration(100+rand.IntN(400)) * time.Millisecond)
			if err := n.KillAgent(); err != nil {
				t.Fatal(err)
			}
		}
		kills++
		if err := n.StartAgent(ctx); err != nil {
			t.Fatal(err)
		}
	}
	ops := churners.end(t)
	if t.Failed() {
		t.FailNow()
	}
	s := emu.Snapshot()
	t.Logf("%d kills (%d with a CreateRouteEntry reply lost); %d ADD/DEL operations; %d faults fired", kills, heldKills, ops,
		s.Errors[ecsemu.CodeThrottling]+s.Errors[ecsemu.CodeInternalError])
	if heldKills == 0 || s.Errors[ecsemu.CodeThrottling]+s.Errors[ecsemu.CodeInternalError] == 0 {
		t.Fatal("the test exercised neither the lost reply nor the faults")
	}

	// settled (in addressesAfterBurst) checks route mode too: one Available entry per node,
	// allocations inside the CIDRs.
	live := addressesAfterBurst(t, ctx, l)
	// A survivor on each node still reaches one on the other.
	var a, b *lab.Pod
	for _, p := range live {
		if p.Node.Index == 0 && a == nil {
			a = p
		}
		if p.Node.Index == 1 && b == nil {
			b = p
		}
	}
	if a == nil || b == nil {
		t.Fatalf("no survivor on one of the nodes (%d live pods)", len(live))
	}
	srv, err := b.Serve(9000)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if got, err := a.Ask(ctx, netip.AddrPortFrom(b.IP, 9000).String(), "ping"); err != nil || got != b.Key() {
		t.Errorf("%s → %s across nodes after the burst: %q, %v", a.Key(), b.Key(), got, err)
	}
}

// deleteRouteOf removes the route entry whose next hop is instance at once, as an operator
// deleting it in the console would (not through the API, where the injected faults are).
func deleteRouteOf(t *testing.T, ctx context.Context, emu *ecsemu.Emulator, instance string) {
	t.Helper()
	id := ""
	for _, r := range emu.Snapshot().Routes {
		if r.NextHopID == instance {
			id = r.ID
		}
	}
	if id == "" {
		t.Fatalf("no route entry to %s to delete", instance)
	}
	if err := emu.DeleteRouteEntryNow(id); err != nil {
		t.Fatal(err)
	}
}
