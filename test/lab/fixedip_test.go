//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/agent/kube"
	"github.com/tern-net/tern/ipam/fixedip"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/lab"
)

// TestFixedIPFollowsStatefulSetPodAcrossNodes: a StatefulSet pod annotated
// k8s.aliyun.com/pod-ip-fixed gets address A on node-1 and is reachable from a pod of node-2
// and through a ClusterIP; deleted on node-1 and recreated on node-2 within the hold time, it
// comes up with A, reachable the same ways, and the emulator shows A on node-2's ENI only
// (the assign there retried while the emulator kept the address busy after node-1's
// unassign: ListingLag.Reassign). After a final delete A stays held for the hold time, then
// is released: the FixedIP record goes and node-2's agent no longer holds it. A second pod
// of the set, deleted, is released at once when the set is scaled below its ordinal.
// The agents write the FixedIP records in the real apiserver (the CRD of deploy/manifests).
func TestFixedIPFollowsStatefulSetPodAcrossNodes(t *testing.T) {
	const hold = 10 * time.Second
	l := upKubernetes(t, lab.Options{Nodes: 2,
		ListingLag:  ecsemu.ListingLag{Unassigned: ecsemu.Duration(500 * time.Millisecond), Reassign: ecsemu.Duration(700 * time.Millisecond)},
		AgentConfig: func(_ *lab.Node, c *agent.Config) { c.FixedIPHoldTime = agent.Duration(hold) }})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := l.Client()
	dyn, err := dynamic.NewForConfig(l.RestConfig())
	if err != nil {
		t.Fatal(err)
	}
	const ns = "db"
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	// The lab runs no StatefulSet controller: the test plays its part (pods named
	// web-<ordinal>, controlled by the set, with the template's annotation).
	replicas := int32(2)
	labels := map[string]string{"app": "web"}
	fixedAnn := map[string]string{fixedip.Annotation: "true"}
	set, err := c.AppsV1().StatefulSets(ns).Create(ctx, &appsv1.StatefulSet{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: appsv1.StatefulSetSpec{Replicas: &replicas, ServiceName: "web", Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels, Annotations: fixedAnn},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "tern.invalid/app"}}}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	yes := true
	owner := []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "StatefulSet", Name: "web", UID: set.UID, Controller: &yes}}
	svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("http"), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := svc.Spec.ClusterIP
	n1, n2 := l.Node(0), l.Node(1)
	runWeb := func(name string, n *lab.Node) *lab.Pod {
		t.Helper()
		p, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: name, Node: n.Name, Labels: labels, HTTPPort: 8080,
			Annotations: fixedAnn, OwnerReferences: owner})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	clients := map[string]*lab.Pod{}
	for _, n := range []*lab.Node{n1, n2} {
		p, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "client-" + n.Name, Node: n.Name})
		if err != nil {
			t.Fatal(err)
		}
		clients[n.Name] = p
	}
	// reach asks url from a client pod until the answer names want (the ClusterIP's
	// EndpointSlice follows the pod through the controller-manager).
	reach := func(from *lab.Pod, url, want string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		var body string
		var err error
		for time.Now().Before(deadline) {
			if body, err = from.HTTPGet(ctx, url); err == nil && strings.Contains(body, want) {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("%s from %s: last answer %q, error %v; want %q", url, from.Name, body, err, want)
	}
	record := func(name string) *fixedip.Record {
		t.Helper()
		u, err := dyn.Resource(kube.FixedIPResource).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			if strings.Contains(err.Error(), "not found") {
				return nil
			}
			t.Fatal(err)
		}
		ip, _, _ := unstructuredString(u.Object, "spec", "ip")
		node, _, _ := unstructuredString(u.Object, "spec", "node")
		phase, _, _ := unstructuredString(u.Object, "spec", "phase")
		return &fixedip.Record{Namespace: ns, Name: name, IP: netip.MustParseAddr(ip), Node: node, Phase: fixedip.Phase(phase)}
	}
	waitRecord := func(name string, ok func(*fixedip.Record) bool, within time.Duration, what string) *fixedip.Record {
		t.Helper()
		deadline := time.Now().Add(within)
		for {
			r := record(name)
			if ok(r) {
				return r
			}
			if time.Now().After(deadline) {
				t.Fatalf("FixedIP %s/%s after %s: %+v; want %s", ns, name, within, r, what)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// onENIsOf lists the ENIs of instance that have ip in the emulator; more than one ENI
	// anywhere with it fails the test.
	onENIsOf := func(ip netip.Addr) map[string][]string {
		t.Helper()
		out := map[string][]string{}
		total := 0
		for _, e := range l.Emulator().Snapshot().ENIs {
			if slices.Contains(e.IPs, ip.String()) {
				out[e.InstanceID] = append(out[e.InstanceID], e.ID)
				total++
			}
		}
		if total > 1 {
			t.Fatalf("%s is on %d ENIs at once: %v", ip, total, out)
		}
		return out
	}
	holds := func(n *lab.Node, name string) bool {
		t.Helper()
		st, err := n.Client().State(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for k := range st.Allocations {
			if strings.HasPrefix(k, ns+"/"+name+"/") {
				return true
			}
		}
		return false
	}
	// letGo waits until n no longer holds the pod's address: a hold pass deletes the record
	// first and then releases the address, so the release follows the record's deletion.
	letGo := func(n *lab.Node, name, what string) {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for holds(n, name) {
			if time.Now().After(deadline) {
				t.Fatalf("%s still holds %s's address 15s %s", n.Name, name, what)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}

	// Node 1: address A, reachable across nodes and through the ClusterIP.
	p1 := runWeb("web-0", n1)
	a := p1.IP
	reach(clients[n2.Name], fmt.Sprintf("http://%s:8080/", a), "web-0 on "+n1.Name)
	reach(clients[n2.Name], "http://"+vip+":80/", "web-0 on "+n1.Name)
	if r := record("web-0"); r == nil || r.IP != a || r.Node != n1.Name || r.Phase != fixedip.PhaseInUse {
		t.Fatalf("FixedIP after the first start: %+v; want %s InUse on %s", r, a, n1.Name)
	}
	if on := onENIsOf(a); len(on[n1.InstanceID]) != 1 {
		t.Fatalf("%s on %v; want an ENI of %s", a, on, n1.InstanceID)
	}

	// Deleted on node 1: held there.
	if err := l.DeletePod(ctx, p1); err != nil {
		t.Fatal(err)
	}
	deleted := time.Now()
	waitRecord("web-0", func(r *fixedip.Record) bool { return r != nil && r.Phase == fixedip.PhaseHeld && r.Node == n1.Name },
		5*time.Second, "Held on "+n1.Name)

	// Recreated on node 2 within the hold time: the same address.
	p2 := runWeb("web-0", n2)
	movedIn := time.Since(deleted)
	if p2.IP != a {
		t.Fatalf("web-0 recreated on %s got %s; want its fixed %s", n2.Name, p2.IP, a)
	}
	if movedIn >= hold {
		t.Fatalf("the move took %s, beyond the hold time %s", movedIn, hold)
	}
	on := onENIsOf(a)
	if len(on[n2.InstanceID]) != 1 || len(on[n1.InstanceID]) != 0 {
		t.Fatalf("after the move %s is on %v; want only an ENI of %s", a, on, n2.InstanceID)
	}
	if n := l.Emulator().Snapshot().Errors[ecsemu.CodeIPAddressAlreadyUsed]; n == 0 {
		t.Fatal("the emulator never answered InvalidPrivateIpAddress.Duplicated: node-2's assign was not retried")
	}
	if r := record("web-0"); r.Node != n2.Name || r.Phase != fixedip.PhaseInUse {
		t.Fatalf("FixedIP after the move: %+v", r)
	}
	reach(clients[n1.Name], fmt.Sprintf("http://%s:8080/", a), "web-0 on "+n2.Name)
	reach(clients[n2.Name], fmt.Sprintf("http://%s:8080/", a), "web-0 on "+n2.Name)
	reach(clients[n1.Name], "http://"+vip+":80/", "web-0 on "+n2.Name)
	// Node 1 lets its hold go once it sees the record name node 2.
	letGo(n1, "web-0", "after the move")

	// Scale-down: web-1, deleted, then the set scaled to 1: released before its hold time.
	pw1 := runWeb("web-1", n1)
	if err := l.DeletePod(ctx, pw1); err != nil {
		t.Fatal(err)
	}
	waitRecord("web-1", func(r *fixedip.Record) bool { return r != nil && r.Phase == fixedip.PhaseHeld }, 5*time.Second, "Held")
	one := int32(1)
	cur, err := c.AppsV1().StatefulSets(ns).Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Spec.Replicas = &one
	if _, err := c.AppsV1().StatefulSets(ns).Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	scaled := time.Now()
	waitRecord("web-1", func(r *fixedip.Record) bool { return r == nil }, hold, "gone after the scale-down")
	if took := time.Since(scaled); took >= hold {
		t.Fatalf("the scale-down released web-1's address after %s; want it before the hold time", took)
	}
	letGo(n1, "web-1", "after the scale-down released it")

	// Final delete: held for the hold time, then released.
	finalDelete := time.Now() // the DEL runs inside DeletePod, after this
	if err := l.DeletePod(ctx, p2); err != nil {
		t.Fatal(err)
	}
	waitRecord("web-0", func(r *fixedip.Record) bool { return r != nil && r.Phase == fixedip.PhaseHeld && r.Node == n2.Name },
		5*time.Second, "Held on "+n2.Name)
	waitRecord("web-0", func(r *fixedip.Record) bool { return r == nil }, hold+15*time.Second, "released past the hold time")
	if took := time.Since(finalDelete); took < hold {
		t.Fatalf("released %s after the final delete, before the hold time %s", took, hold)
	}
	letGo(n2, "web-0", "after the hold time released it")
	onENIsOf(a) // still at most one ENI
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.CheckCloudMatchesAgents(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("address %s: moved %s → %s in %s after the delete; released %s after the final delete (hold %s)",
		a, n1.Name, n2.Name, movedIn.Round(time.Millisecond), time.Since(finalDelete).Round(time.Millisecond), hold)
}

func unstructuredString(obj map[string]any, fields ...string) (string, bool, error) {
	var cur any = obj
	for _, f := range fields {
		m, ok := cur.(map[string]any)
		if !ok {
			return "", false, nil
		}
		cur = m[f]
	}
	s, ok := cur.(string)
	return s, ok, nil
}
