//go:build linux

package kube_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tern-net/tern/ipam/nodereport"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/lab"
)

// When a node runs out of pod addresses, an operator sees it where they look: a Warning
// Event on the pod that could not start, naming the cause, and the TernPodIPsExhausted
// condition on the Node; the Node's annotations list the ENI addresses in use.
func TestIPExhaustionIsReportedOnPodAndNode(t *testing.T) {
	getLab(t) // the suite's binaries and privilege checks
	const tiny, spare = "vsw-e2e-tiny", "vsw-e2e-spare"
	l, err := lab.Up(context.Background(), lab.Options{Nodes: 1, Kubernetes: true, BinDir: current.bin,
		ExtraVSwitches: []ecsemu.VSwitchConfig{{ID: tiny, Zone: lab.Zone, CIDR: "192.168.40.0/29"},
			{ID: spare, Zone: lab.Zone, CIDR: "192.168.41.0/24"}},
		ENIConf:      lab.ENIConf{VSwitches: []string{tiny}, MaxPoolSize: 4},
		AllocateWait: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Down()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := l.Client()
	const ns = "e2e-exhaust"
	// A /29 has 4 usable addresses (the first and the last three are reserved), and every one
	// serves a pod: the ENI's primary address too, as in Terway's capacity.
	for i := range 4 {
		if _, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: fmt.Sprintf("fits-%d", i), Node: "node-1"}); err != nil {
			t.Fatalf("pod %d of 4 on the /29: %v", i, err)
		}
	}
	if _, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "too-many", Node: "node-1"}); err == nil {
		t.Fatal("a 5th pod got an address from a /29 that holds 4")
	}

	eventually(t, 30*time.Second, "a Warning Event on the pod", func() (bool, string) {
		evs, err := c.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=too-many"})
		if err != nil {
			return false, err.Error()
		}
		for _, e := range evs.Items {
			if e.Type == corev1.EventTypeWarning && e.Reason == "TernPodIPsExhausted" && strings.Contains(e.Message, tiny) {
				t.Logf("event on the pod: %s: %s", e.Reason, e.Message)
				return true, ""
			}
		}
		return false, fmt.Sprintf("%d events, none a TernPodIPsExhausted warning naming %s", len(evs.Items), tiny)
	})
	eventually(t, 30*time.Second, "the Node's condition and annotations", func() (bool, string) {
		n, err := c.CoreV1().Nodes().Get(ctx, "node-1", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		cond := ""
		for _, x := range n.Status.Conditions {
			if x.Type == nodereport.ConditionIPExhausted {
				cond = string(x.Status)
			}
		}
		ann := n.Annotations[nodereport.AnnotationAllocatedENIIPs]
		return cond == "True" && strings.Count(ann, "192.168.40.") == 4 && n.Annotations[nodereport.AnnotationMaxAvailableIP] != "",
			fmt.Sprintf("condition %q, allocated-eniips %q", cond, ann)
	})

	// A cloud that refuses (a RAM policy without the ENI permissions): the Event carries the
	// cloud's own error code.
	l.Emulator().InjectFault(ecsemu.Fault{Code: "Forbidden.RAM", Status: 403, Message: "the RAM user lacks ecs:AssignPrivateIpAddresses"})
	n := l.Node(0)
	conf := n.ENIConf()
	conf.VSwitches = []string{tiny, spare}
	reloads := eniConfReloads(t, ctx, n)
	if err := n.UpdateENIConf(conf); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "the agent applying the new eni_conf", func() (bool, string) {
		got := eniConfReloads(t, ctx, n)
		return got > reloads, fmt.Sprintf("%d reloads applied, %d before the change", got, reloads)
	})
	if _, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "denied", Node: "node-1"}); err == nil {
		t.Fatal("a pod got an address while the cloud refused every call")
	}
	eventually(t, 30*time.Second, "an Event with the cloud's error code", func() (bool, string) {
		evs, err := c.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=denied"})
		if err != nil {
			return false, err.Error()
		}
		for _, e := range evs.Items {
			if e.Type == corev1.EventTypeWarning && strings.Contains(e.Message, "Forbidden.RAM") {
				t.Logf("event on the pod: %s: %s", e.Reason, e.Message)
				return true, ""
			}
		}
		return false, fmt.Sprintf("%d events, none naming Forbidden.RAM", len(evs.Items))
	})

	// The cloud recovers: the next pod starts from the new vSwitch and the condition clears.
	l.Emulator().ClearFaults()
	if _, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "after", Node: "node-1"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "the condition to clear", func() (bool, string) {
		n, err := c.CoreV1().Nodes().Get(ctx, "node-1", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		for _, x := range n.Status.Conditions {
			if x.Type == nodereport.ConditionIPExhausted {
				return x.Status == corev1.ConditionFalse, string(x.Status) + ": " + x.Message
			}
		}
		return false, "no condition"
	})
}

// eniConfReloads is the node agent's count of eni_conf reloads it has applied.
func eniConfReloads(t *testing.T, ctx context.Context, n *lab.Node) int {
	t.Helper()
	m, err := n.Client().Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(m, "\n") {
		if v, ok := strings.CutPrefix(line, `tern_eniconfig_reloads_total{result="ok"} `); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric line %q: %v", line, err)
			}
			return int(f)
		}
	}
	return 0
}
