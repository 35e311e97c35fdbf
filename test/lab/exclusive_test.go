//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/k8s/controlplane"
	"github.com/tern-net/tern/test/lab"
)

// upExclusive starts a two-node Kubernetes lab whose first node carries Terway's exclusive-ENI
// label before its agent starts (the agent reads it once, at start).
func upExclusive(t *testing.T, o lab.Options) *lab.Lab {
	t.Helper()
	o.Nodes, o.DeferAgents = 2, true
	o.ENIConf.ServiceCIDR = controlplane.DefaultServiceCIDR
	l := upKubernetes(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%q}}}`, ipam.LabelExclusiveENI, ipam.LabelExclusiveENIOnly)
	if _, err := l.Client().CoreV1().Nodes().Patch(ctx, l.Node(0).Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, n := range l.Nodes() {
		if err := n.StartAgent(ctx); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

// exclusiveInCloud lists the emulator's exclusive ENIs.
func exclusiveInCloud(s ecsemu.State) map[string]ecsemu.ENIState {
	out := map[string]ecsemu.ENIState{}
	for _, e := range s.ENIs {
		if e.Tags[ipam.TagKind] == string(ipam.KindENI) {
			out[e.ID] = e
		}
	}
	return out
}

// nodeENIResource polls the Node's aliyun/eni capacity until it equals want.
func nodeENIResource(t *testing.T, l *lab.Lab, ctx context.Context, node string, want func() int64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		n, err := l.Client().CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		q, ok := n.Status.Capacity[corev1.ResourceName(ipam.ResourceENI)]
		a := n.Status.Allocatable[corev1.ResourceName(ipam.ResourceENI)]
		w := want()
		if ok && q.Value() == w && a.Value() == w {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node %s: %s capacity %v allocatable %v (present %v), want %d", node, ipam.ResourceENI, q.String(), a.String(), ok, w)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// checkExclusivePod asserts that p holds its own ENI: the agent's allocation is of kind eni
// with the ENI's primary address, the cloud lists it InUse on the node, its link is the pod's
// eth0 (with veth1 beside it) and no longer in the node. It returns the cloud's ENI.
func checkExclusivePod(t *testing.T, l *lab.Lab, ctx context.Context, p *lab.Pod) ecsemu.ENIState {
	t.Helper()
	st, err := p.Node.Client().State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var al api.Allocation
	for k, a := range st.Allocations {
		if strings.HasPrefix(k, p.Namespace+"/"+p.Name+"/") {
			al = a
		}
	}
	if al.Kind != api.KindENI || al.IP != p.IP.String() {
		t.Fatalf("agent allocation of %s: %+v (pod IP %s), want kind eni", p.Key(), al, p.IP)
	}
	cloudENI, ok := exclusiveInCloud(l.Emulator().Snapshot())[al.ENI.ID]
	if !ok || cloudENI.PrimaryIP != p.IP.String() || cloudENI.Status != "InUse" || cloudENI.InstanceID != p.Node.InstanceID {
		t.Fatalf("cloud ENI %s: %+v, want InUse on %s with primary %s", al.ENI.ID, cloudENI, p.Node.InstanceID, p.IP)
	}
	if err := nsutil.Do(p.NS(), func() error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if l.Attrs().HardwareAddr.String() != cloudENI.MAC {
			return fmt.Errorf("pod eth0 has MAC %s, the ENI %s", l.Attrs().HardwareAddr, cloudENI.MAC)
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
		if err != nil || len(addrs) != 1 || addrs[0].IP.String() != p.IP.String() {
			return fmt.Errorf("pod eth0 addresses %v (%v), want %s", addrs, err, p.IP)
		}
		if _, err := netlink.LinkByName("veth1"); err != nil {
			return fmt.Errorf("no veth1 beside the ENI: %w", err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := nsutil.Do(p.Node.NS, func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, l := range links {
			if l.Attrs().HardwareAddr.String() == cloudENI.MAC {
				return fmt.Errorf("the ENI's link %s is still in the node namespace", l.Attrs().Name)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return cloudENI
}

// httpEventually fetches url from a pod until the answer contains want.
func httpEventually(t *testing.T, ctx context.Context, from *lab.Pod, url, want string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		body, err := from.HTTPGet(ctx, url)
		if err == nil && strings.Contains(body, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s → %s: %q, %v (want an answer from %s)", from.Name, url, body, err, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestExclusiveENIPodWithoutKubernetes: an agent without a kubeconfig whose nodeLabels carry
// the exclusive-ENI label serves a pod whose runtime passes k8s.aliyun.com/eni: "true" with its
// own ENI, moved into the pod; it talks to an ENIIP pod of the other node both ways through the
// VPC; DEL and GC leave no exclusive ENI, and cloud and agents agree.
func TestExclusiveENIPodWithoutKubernetes(t *testing.T) {
	l := up(t, lab.Options{Nodes: 2, AgentConfig: func(n *lab.Node, c *agent.Config) {
		if n.Index == 0 {
			c.NodeLabels = map[string]string{ipam.LabelExclusiveENI: ipam.LabelExclusiveENIOnly}
		}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	settled(t, l, ctx)
	ex, err := l.AddPodAnnotated(ctx, 0, "excl", "ex", map[string]string{ipam.AnnotationENI: "true"})
	if err != nil {
		t.Fatal(err)
	}
	peer, err := l.AddPod(ctx, 1, "excl", "peer")
	if err != nil {
		t.Fatal(err)
	}
	// The same annotation on the unlabelled node: refused, naming the label.
	if _, err := l.AddPodAnnotated(ctx, 1, "excl", "nope", map[string]string{ipam.AnnotationENI: "true"}); err == nil ||
		!strings.Contains(err.Error(), ipam.LabelExclusiveENI) {
		t.Fatalf("exclusive pod on the unlabelled node: %v, want a refusal naming %s", err, ipam.LabelExclusiveENI)
	}
	checkExclusivePod(t, l, ctx, ex)
	for _, p := range []*lab.Pod{ex, peer} {
		if _, err := p.ServeHTTP(8080); err != nil {
			t.Fatal(err)
		}
	}
	httpEventually(t, ctx, ex, fmt.Sprintf("http://%s:8080/", peer.IP), "peer")
	httpEventually(t, ctx, peer, fmt.Sprintf("http://%s:8080/", ex.IP), "ex")
	settled(t, l, ctx)
	for _, p := range []*lab.Pod{ex, peer} {
		if err := l.DeletePod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if left := exclusiveInCloud(l.Emulator().Snapshot()); len(left) != 0 {
		t.Fatalf("exclusive ENIs left after DEL: %v", left)
	}
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	settled(t, l, ctx)
}

// TestExclusiveENIPodAcrossNodes: on a node labelled for exclusive ENIs, a pod annotated
// k8s.aliyun.com/eni gets its own ENI: its address is the ENI's primary, the ENI's link is
// the pod's eth0 (gone from the node), it talks to an ENIIP pod of the other node in both
// directions and reaches a ClusterIP through its veth; the Node publishes aliyun/eni as the
// ENI quota − 1 − the ENIs the ENIIP pool holds; DEL and GC leave the emulator's ENIs as they
// were before the pods.
func TestExclusiveENIPodAcrossNodes(t *testing.T) {
	l := upExclusive(t, lab.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	emu, c := l.Emulator(), l.Client()
	settled(t, l, ctx)
	const ns = "excl"
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	n0 := l.Node(0)
	quota := 4 - 1 // ecs.g7.xlarge: EniQuantity 4, less the primary
	poolENIs := func() int {
		k := 0
		for _, e := range emu.Snapshot().ENIs {
			if e.Tags[ipam.TagNode] == n0.Name && e.Tags[ipam.TagKind] == "" && e.Tags[ipam.TagCreator] == ipam.TagCreatorTern {
				k++
			}
		}
		return k
	}
	nodeENIResource(t, l, ctx, n0.Name, func() int64 { return int64(quota - poolENIs()) })
	if n1, err := c.CoreV1().Nodes().Get(ctx, l.Node(1).Name, metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	} else if _, ok := n1.Status.Capacity[corev1.ResourceName(ipam.ResourceENI)]; ok {
		t.Fatalf("the unlabelled node publishes %s", ipam.ResourceENI)
	}
	svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("http"), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	before := emu.Snapshot()

	// A Service backend beside the exclusive pod, and an ENIIP pod on the other node.
	web, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "web", Node: n0.Name, Labels: map[string]string{"app": "web"}, HTTPPort: 8080})
	if err != nil {
		t.Fatal(err)
	}
	peer, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "peer", Node: l.Node(1).Name, HTTPPort: 8080})
	if err != nil {
		t.Fatal(err)
	}
	ex, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "ex", Node: n0.Name, HTTPPort: 8080,
		Annotations: map[string]string{ipam.AnnotationENI: "true"}})
	if err != nil {
		t.Fatal(err)
	}

	// The pod's address is its own ENI's primary, and the ENI's link is in its namespace.
	checkExclusivePod(t, l, ctx, ex)
	nodeENIResource(t, l, ctx, n0.Name, func() int64 { return int64(quota - poolENIs()) })

	// Across nodes, both ways, through the VPC.
	httpEventually(t, ctx, ex, fmt.Sprintf("http://%s:8080/", peer.IP), "peer")
	httpEventually(t, ctx, peer, fmt.Sprintf("http://%s:8080/", ex.IP), "ex")
	// A ClusterIP, through the veth and the pod programs on its host end.
	httpEventually(t, ctx, ex, fmt.Sprintf("http://%s:80/", svc.Spec.ClusterIP), "web")
	settled(t, l, ctx)

	for _, p := range []*lab.Pod{ex, web, peer} {
		if err := l.DeletePod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if left := exclusiveInCloud(emu.Snapshot()); len(left) != 0 {
		t.Fatalf("exclusive ENIs left after DEL and GC: %v", left)
	}
	settled(t, l, ctx)
	after := emu.Snapshot()
	ids := func(s ecsemu.State) string {
		var out []string
		for _, e := range s.ENIs {
			out = append(out, e.ID+"/"+e.Status)
		}
		return strings.Join(out, " ")
	}
	// The ENIIP pools may keep their warm ENIs; every ENI now is one that was there before.
	was := map[string]bool{}
	for _, e := range before.ENIs {
		was[e.ID] = true
	}
	for _, e := range after.ENIs {
		if !was[e.ID] && e.Tags[ipam.TagKind] != "" {
			t.Fatalf("ENI %s appeared and stayed: before [%s], after [%s]", e.ID, ids(before), ids(after))
		}
	}
}

// TestExclusiveENIFaultsAndKillDuringBurst (no Kubernetes: the node's labels come from the
// agent's nodeLabels, the pods' request from the runtime's annotations): with 30 %
// Throttling/InternalError on every cloud call, a burst of exclusive pods on the labelled node while its agent is killed (kill -9) and
// restarted: every pod ends with its own ENI and address (none twice), and after the pods are
// deleted and GC runs the cloud holds no exclusive ENI.
func TestExclusiveENIFaultsAndKillDuringBurst(t *testing.T) {
	l := up(t, lab.Options{Nodes: 2, Seed: 12, AgentConfig: func(n *lab.Node, c *agent.Config) {
		if n.Index == 0 {
			c.NodeLabels = map[string]string{ipam.LabelExclusiveENI: ipam.LabelExclusiveENIOnly}
		}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	emu := l.Emulator()
	n0 := l.Node(0)
	const ns = "burst"
	emu.InjectFault(ecsemu.Fault{Code: ecsemu.CodeThrottling, Rate: 0.15})
	emu.InjectFault(ecsemu.Fault{Code: ecsemu.CodeInternalError, Rate: 0.15})

	wait := startPodsUntilUp(t, ctx, l, 0, ns, []string{"ex-0", "ex-1", "ex-2"}, map[string]string{ipam.AnnotationENI: "true"})
	// Kill the agent once the first exclusive ENI is being made, then start it again.
	deadline := time.Now().Add(60 * time.Second)
	for len(exclusiveInCloud(emu.Snapshot())) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if err := n0.KillAgent(); err != nil {
		t.Fatal(err)
	}
	t.Logf("killed the agent of %s with %d exclusive ENIs in the cloud", n0.Name, len(exclusiveInCloud(emu.Snapshot())))
	if err := n0.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	running := wait()
	requireDistinctAddresses(t, running)
	snap := emu.Snapshot()
	if snap.Errors[ecsemu.CodeThrottling]+snap.Errors[ecsemu.CodeInternalError] < 3 {
		t.Fatalf("faults barely fired (%v): the test proves nothing", snap.Errors)
	}
	emu.ClearFaults()
	// What the kill interrupted is finished by the restarted agent (start-up and GC).
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	settled(t, l, ctx)
	for _, p := range running {
		if err := l.DeletePod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		left := exclusiveInCloud(emu.Snapshot())
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("exclusive ENIs leaked: %v", left)
		}
		if err := l.GC(ctx); err != nil {
			t.Logf("GC: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	settled(t, l, ctx)
}
