package agent

import (
	"context"
	"errors"
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/tern-net/tern/endpoint"
	"github.com/tern-net/tern/ipam"
)

// TestLivePodsAfterAStoreLoss: the union of the three views that survive a lost IPAM store,
// each address named as precisely as a view can (the sandbox table's container ID first).
func TestLivePodsAfterAStoreLoss(t *testing.T) {
	ip := netip.MustParseAddr
	pod := func(ns, name, node, addr string, hostNet bool, phase corev1.PodPhase) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: corev1.PodSpec{NodeName: node, HostNetwork: hostNet}, Status: corev1.PodStatus{Phase: phase}}
		if addr != "" {
			p.Status.PodIPs = []corev1.PodIP{{IP: addr}}
		}
		return p
	}
	client := fake.NewSimpleClientset(
		pod("default", "web", "node-1", "10.0.0.1", false, corev1.PodRunning),      // also in the sandbox table
		pod("default", "db", "node-1", "10.0.0.2", false, corev1.PodRunning),       // apiserver only
		pod("default", "done", "node-1", "10.0.0.3", false, corev1.PodSucceeded),   // terminal
		pod("kube-system", "proxy", "node-1", "10.0.0.4", true, corev1.PodRunning), // host network
	)
	alive := func(ifindex int) bool { return ifindex != 99 }
	recs := []sandboxRecord{
		{ContainerID: "abc", IfName: "eth0", Pod: "default/web", IfIndex: 10, IP: ip("10.0.0.1")},
		{ContainerID: "dead", IfName: "eth0", Pod: "default/gone", IfIndex: 99, IP: ip("10.0.0.9")}, // veth gone
	}
	eps := []endpoint.Endpoint{
		{IfIndex: 10, Addr: ip("10.0.0.1")},
		{IfIndex: 11, Addr: ip("10.0.0.5")}, // the datapath alone knows it
		{IfIndex: 99, Addr: ip("10.0.0.8")}, // veth gone
	}
	got, err := livePodsFrom(context.Background(), eps, recs, alive, client, "node-1")
	if err != nil {
		t.Fatal(err)
	}
	want := map[netip.Addr]ipam.PodKey{
		ip("10.0.0.1"): {Namespace: "default", Name: "web", ContainerID: "abc"},
		ip("10.0.0.2"): ipam.RecoveredKey("default", "db"),
		ip("10.0.0.5"): ipam.RecoveredKey(recoveredNamespace, "ifindex-11"),
	}
	if len(got) != len(want) {
		t.Errorf("live pods %v, want %v", got, want)
	}
	for a, k := range want {
		if got[a] != k {
			t.Errorf("%s: %v, want %v", a, got[a], k)
		}
	}

	// An apiserver that cannot answer is an error, not an empty set: the pool holds.
	client.PrependReactor("list", "pods", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("connection refused")
	})
	if _, err := livePodsFrom(context.Background(), eps, recs, alive, client, "node-1"); err == nil {
		t.Fatal("livePodsFrom answered with the apiserver unreachable")
	}
	// Without a kubeconfig the two local views answer.
	got, err = livePodsFrom(context.Background(), eps, recs, alive, nil, "node-1")
	if err != nil || len(got) != 2 {
		t.Fatalf("without an apiserver: %v, %v; want the sandbox's and the registry's addresses", got, err)
	}
}
