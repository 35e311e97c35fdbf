package trunk_test

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/ipam/trunk"
	"github.com/tern-net/tern/test/k8s/controlplane"
	"github.com/tern-net/tern/test/k8s/kubeletsim"
)

// TestPublishNode: a real apiserver shows aliyun/member-eni as the Node's capacity and
// allocatable, with Terway's annotations; trunking off publishes 0 and drops trunk-on.
func TestPublishNode(t *testing.T) {
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
	check := func(quota int64, trunkID string) {
		t.Helper()
		n, err := client.CoreV1().Nodes().Get(ctx, "node-a", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		name := corev1.ResourceName(trunk.ResourceMemberENI)
		c, a := n.Status.Capacity[name], n.Status.Allocatable[name]
		if c.Value() != quota || a.Value() != quota {
			t.Fatalf("%s capacity %s allocatable %s, want %d", name, c.String(), a.String(), quota)
		}
		if got, ok := n.Annotations[trunk.AnnotationTrunkOn]; got != trunkID || ok != (trunkID != "") {
			t.Fatalf("%s = %q (present %t), want %q", trunk.AnnotationTrunkOn, got, ok, trunkID)
		}
	}
	if err := trunk.PublishNode(ctx, client, "node-a", "eni-trunk1", 3); err != nil {
		t.Fatal(err)
	}
	check(3, "eni-trunk1")
	if err := trunk.PublishNode(ctx, client, "node-a", "", 0); err != nil {
		t.Fatal(err)
	}
	check(0, "")
}
