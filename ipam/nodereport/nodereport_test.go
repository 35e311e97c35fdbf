package nodereport_test

import (
	"context"
	"encoding/json"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/ipam/nodereport"
	"github.com/tern-net/tern/test/k8s/controlplane"
	"github.com/tern-net/tern/test/k8s/kubeletsim"
)

func TestReportsOnTheNode(t *testing.T) {
	if _, err := controlplane.BinDir(); err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	client := kubernetes.NewForConfigOrDie(cp.RestConfig())
	if _, err := kubeletsim.EnsureNode(ctx, client, "node-a", "192.168.0.10"); err != nil {
		t.Fatal(err)
	}

	snap := nodereport.Snapshot{ENIIPs: map[string][]string{"eni-1": {"192.168.0.20", "192.168.0.21"}}, MaxPods: 10, InUse: 2}
	r := nodereport.New(client, "node-a", func() nodereport.Snapshot { return snap }, time.Hour, nil)
	check := func(wantStatus corev1.ConditionStatus) {
		t.Helper()
		if err := r.Report(ctx); err != nil {
			t.Fatal(err)
		}
		n, err := client.CoreV1().Nodes().Get(ctx, "node-a", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if snap.PodCIDR != "" {
			if v, ok := n.Annotations[nodereport.AnnotationAllocatedENIIPs]; ok {
				t.Fatalf("route mode: allocated-eniips annotation %q is still on the Node, want it removed", v)
			}
		} else {
			var got map[string][]string
			if err := json.Unmarshal([]byte(n.Annotations[nodereport.AnnotationAllocatedENIIPs]), &got); err != nil || !reflect.DeepEqual(got, snap.ENIIPs) {
				t.Fatalf("allocated-eniips annotation = %q (%v), want %v", n.Annotations[nodereport.AnnotationAllocatedENIIPs], err, snap.ENIIPs)
			}
		}
		if want := strconv.Itoa(snap.MaxPods); n.Annotations[nodereport.AnnotationMaxAvailableIP] != want {
			t.Fatalf("max-available-ip = %q, want %s", n.Annotations[nodereport.AnnotationMaxAvailableIP], want)
		}
		for name, want := range snap.ExtendedResources {
			c, a := n.Status.Capacity[corev1.ResourceName(name)], n.Status.Allocatable[corev1.ResourceName(name)]
			if c.Value() != int64(want) || a.Value() != int64(want) {
				t.Fatalf("extended resource %s: capacity %s allocatable %s, want %d", name, c.String(), a.String(), want)
			}
		}
		for _, c := range n.Status.Conditions {
			if c.Type == nodereport.ConditionIPExhausted {
				if c.Status != wantStatus {
					t.Fatalf("condition %s = %s (%s), want %s", c.Type, c.Status, c.Message, wantStatus)
				}
				if snap.PodCIDR != "" && !strings.Contains(c.Message, snap.PodCIDR) {
					t.Fatalf("condition %s message %q does not name the pod CIDR %s", c.Type, c.Message, snap.PodCIDR)
				}
				return
			}
		}
		t.Fatal("no IP exhaustion condition on the node")
	}
	check(corev1.ConditionFalse)

	snap = nodereport.Snapshot{ENIIPs: map[string][]string{"eni-1": {"192.168.0.20"}}, MaxPods: 10, InUse: 1,
		Exhausted: true, Reason: "InvalidVSwitchId.IpNotEnough: vsw-a has no free addresses",
		ExtendedResources: map[string]int{"aliyun/eni": 3}}
	check(corev1.ConditionTrue)

	// The node switches to the VPC route mode (drained, store moved aside): pods take
	// addresses of its /24 pod CIDR, no ENI holds them. The stale ENI annotation goes; the
	// capacity is the CIDR's 254 addresses.
	snap = nodereport.Snapshot{PodCIDR: "10.244.1.0/24", MaxPods: 254, InUse: 3}
	check(corev1.ConditionFalse)
}
