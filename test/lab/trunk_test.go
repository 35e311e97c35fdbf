//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/ipam/trunk"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/lab"
)

// The lab's instance type (ecs.g7.xlarge, EniQuantity 4) made to support trunking with
// EniTotalQuantity 10: 6 member ENIs per node.
const (
	labTrunkENIs   = 10
	labMemberQuota = labTrunkENIs - 4
)

func trunkingOptions(o lab.Options) lab.Options {
	o.TrunkENIs = labTrunkENIs
	o.ENIConf.EnableENITrunking = true
	return o
}

// membersInCloud lists the emulator's member ENIs (by tag).
func membersInCloud(s ecsemu.State) map[string]ecsemu.ENIState {
	out := map[string]ecsemu.ENIState{}
	for _, e := range s.ENIs {
		if e.Tags[trunk.TagRole] == trunk.RoleMember {
			out[e.ID] = e
		}
	}
	return out
}

// checkMemberPod asserts that p holds a member ENI: the agent's allocation is of kind member
// with a VLAN id, and the cloud shows that ENI as a Member of the node's trunk with the same
// VLAN id and the pod's address as its primary.
func checkMemberPod(t *testing.T, l *lab.Lab, ctx context.Context, p *lab.Pod) ecsemu.ENIState {
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
	if al.Kind != api.KindMember || al.IP != p.IP.String() || al.VLAN < 1 || al.MemberENI == "" {
		t.Fatalf("agent allocation of %s: %+v (pod IP %s), want kind member with a VLAN id", p.Key(), al, p.IP)
	}
	e, ok := membersInCloud(l.Emulator().Snapshot())[al.MemberENI]
	if !ok || e.Type != "Member" || e.Status != "InUse" || e.Trunk != al.ENI.ID || e.DeviceIndex != al.VLAN || e.PrimaryIP != p.IP.String() {
		t.Fatalf("cloud member ENI %s: %+v, want a Member of trunk %s on VLAN %d with primary %s", al.MemberENI, e, al.ENI.ID, al.VLAN, p.IP)
	}
	return e
}

// TestTrunkMemberPodsAcrossNodes: with enable_eni_trunking on an instance type that supports
// trunking, pods annotated k8s.aliyun.com/pod-eni: "true" on two nodes get member ENIs (the
// cloud shows Members with VLAN ids, the Nodes publish aliyun/member-eni and Terway's trunk
// annotations); they talk to each other and to an ENIIP pod of the other node both ways, and
// reach a ClusterIP with a backend on their node and one on the other node; DEL and GC leave
// no member ENI, and cloud and agents agree.
func TestTrunkMemberPodsAcrossNodes(t *testing.T) {
	l := upKubernetes(t, trunkingOptions(lab.Options{Nodes: 2}))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	emu, c := l.Emulator(), l.Client()
	settled(t, l, ctx)
	const ns = "trunk"
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	// The Nodes: aliyun/member-eni and the trunk annotations.
	for _, n := range l.Nodes() {
		deadline := time.Now().Add(30 * time.Second)
		for {
			node, err := c.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			q := node.Status.Allocatable[corev1.ResourceName(ipam.ResourceMemberENI)]
			if q.Value() == labMemberQuota && strings.HasPrefix(node.Annotations[trunk.AnnotationTrunkOn], "eni-") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("node %s: %s allocatable %s, annotations %v; want %d and %s", n.Name, ipam.ResourceMemberENI, q.String(), node.Annotations, labMemberQuota, trunk.AnnotationTrunkOn)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	svc := func(name, app string) *corev1.Service {
		s, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": app}, Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromString("http"), Protocol: corev1.ProtocolTCP}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	local, remote := svc("local", "local"), svc("remote", "remote")
	n0, n1 := l.Node(0), l.Node(1)
	member := map[string]string{trunk.AnnotationPodENI: "true"}
	run := func(name, node string, labels, ann map[string]string) *lab.Pod {
		p, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: name, Node: node, Labels: labels, Annotations: ann, HTTPPort: 8080})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	m0 := run("m0", n0.Name, nil, member)
	m1 := run("m1", n1.Name, nil, member)
	web := run("web", n0.Name, map[string]string{"app": "local"}, nil)
	peer := run("peer", n1.Name, map[string]string{"app": "remote"}, nil)
	e0, e1 := checkMemberPod(t, l, ctx, m0), checkMemberPod(t, l, ctx, m1)
	t.Logf("m0 %s member %s VLAN %d on %s; m1 %s member %s VLAN %d on %s", m0.IP, e0.ID, e0.DeviceIndex, e0.Trunk, m1.IP, e1.ID, e1.DeviceIndex, e1.Trunk)

	httpEventually(t, ctx, m0, fmt.Sprintf("http://%s:8080/", m1.IP), "m1")
	httpEventually(t, ctx, m1, fmt.Sprintf("http://%s:8080/", m0.IP), "m0")
	httpEventually(t, ctx, m0, fmt.Sprintf("http://%s:8080/", peer.IP), "peer")
	httpEventually(t, ctx, peer, fmt.Sprintf("http://%s:8080/", m0.IP), "m0")
	httpEventually(t, ctx, web, fmt.Sprintf("http://%s:8080/", m1.IP), "m1")
	// ClusterIPs: the backend beside the member pod, and the one on the other node.
	httpEventually(t, ctx, m0, fmt.Sprintf("http://%s:80/", local.Spec.ClusterIP), "web")
	httpEventually(t, ctx, m0, fmt.Sprintf("http://%s:80/", remote.Spec.ClusterIP), "peer")
	httpEventually(t, ctx, m1, fmt.Sprintf("http://%s:80/", local.Spec.ClusterIP), "web")
	settled(t, l, ctx)

	for _, p := range []*lab.Pod{m0, m1, web, peer} {
		if err := l.DeletePod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if left := membersInCloud(emu.Snapshot()); len(left) != 0 {
		t.Fatalf("member ENIs left after DEL and GC: %v", left)
	}
	settled(t, l, ctx)
}

// TestTrunkMemberPodsFaultsAndKillDuringBurst (no Kubernetes: the pods' request comes from the
// runtime's annotations): with 30 % Throttling/InternalError and latency on every cloud call,
// a burst of member pods on node 0 while its agent is killed (kill -9) and restarted: every
// pod ends with its own member ENI and address (none twice), cloud and agents agree, and after
// DEL + GC the cloud holds no member ENI.
func TestTrunkMemberPodsFaultsAndKillDuringBurst(t *testing.T) {
	l := up(t, trunkingOptions(lab.Options{Nodes: 2, Seed: 13, Latency: 5 * time.Millisecond}))
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	emu := l.Emulator()
	n0 := l.Node(0)
	const ns = "burst"
	settled(t, l, ctx)
	// A member pod of the other node, to talk to after the storm.
	peer, err := l.AddPodAnnotated(ctx, 1, ns, "peer", map[string]string{trunk.AnnotationPodENI: "true"})
	if err != nil {
		t.Fatal(err)
	}
	emu.InjectFault(ecsemu.Fault{Code: ecsemu.CodeThrottling, Rate: 0.15})
	emu.InjectFault(ecsemu.Fault{Code: ecsemu.CodeInternalError, Rate: 0.15})

	names := []string{"m-0", "m-1", "m-2", "m-3"}
	wait := startPodsUntilUp(t, ctx, l, 0, ns, names, map[string]string{trunk.AnnotationPodENI: "true"})
	// Kill the agent once the burst's first member ENI is being made, then start it again.
	deadline := time.Now().Add(60 * time.Second)
	for len(membersInCloud(emu.Snapshot())) < 2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if err := n0.KillAgent(); err != nil {
		t.Fatal(err)
	}
	t.Logf("killed the agent of %s with %d member ENIs in the cloud", n0.Name, len(membersInCloud(emu.Snapshot())))
	if err := n0.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	running := wait()
	requireDistinctAddresses(t, append([]*lab.Pod{peer}, running...))
	snap := emu.Snapshot()
	if snap.Errors[ecsemu.CodeThrottling]+snap.Errors[ecsemu.CodeInternalError] < 3 {
		t.Fatalf("faults barely fired (%v): the test proves nothing", snap.Errors)
	}
	emu.ClearFaults()
	// What the kill interrupted (a member made for a sandbox whose ADD failed) goes at GC.
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	settled(t, l, ctx)
	for _, p := range running {
		checkMemberPod(t, l, ctx, p)
	}
	if _, err := peer.ServeHTTP(8080); err != nil {
		t.Fatal(err)
	}
	for _, p := range running {
		httpEventually(t, ctx, p, fmt.Sprintf("http://%s:8080/", peer.IP), "peer")
	}
	for _, p := range append([]*lab.Pod{peer}, running...) {
		if err := l.DeletePod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if left := membersInCloud(emu.Snapshot()); len(left) != 0 {
		t.Fatalf("member ENIs leaked: %v", left)
	}
	settled(t, l, ctx)
}
