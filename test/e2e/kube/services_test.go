//go:build linux

package kube_test

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/ternctl"
	"github.com/tern-net/tern/test/lab"
)

// backendsOn returns the backends node's maps hold for frontend (vip:port/proto), and
// whether the frontend exists there.
func backendsOn(t *testing.T, n *lab.Node, front netip.AddrPort, proto string) ([]string, bool) {
	t.Helper()
	svcs, err := ternctl.ReadServicesAt(n.PinRoot())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range svcs {
		if s.Frontend == front && s.Proto == proto {
			var out []string
			for _, b := range s.Backends {
				out = append(out, b.Address.String())
			}
			slices.Sort(out)
			return out, true
		}
	}
	return nil, false
}

// eventually polls cond until it holds or the time is up.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		ok, state := cond()
		if ok {
			return
		}
		last = state
		if time.Now().After(deadline) {
			t.Fatalf("%s: not reached after %s (last: %s)", what, timeout, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// onEveryNode waits until every node's maps hold exactly want for the frontend (nil want:
// the frontend is gone).
func onEveryNode(t *testing.T, l *lab.Lab, front netip.AddrPort, proto string, want []string) {
	t.Helper()
	slices.Sort(want)
	for _, n := range l.Nodes() {
		eventually(t, 60*time.Second, fmt.Sprintf("%s/%s on %s", front, proto, n.Name), func() (bool, string) {
			got, ok := backendsOn(t, n, front, proto)
			if want == nil {
				return !ok, fmt.Sprintf("present with %v", got)
			}
			return ok && slices.Equal(got, want), fmt.Sprintf("present %v, backends %v", ok, got)
		})
	}
}

// whoAnswers sends n HTTP requests from the client through url and counts the answering pods.
// Every request must succeed: there is no retry.
func whoAnswers(t *testing.T, client *lab.Pod, url string, n int) map[string]int {
	t.Helper()
	return whoAnswersFrom(t, client, url, n, nil)
}

// whoAnswersFrom is whoAnswers with the client's source ports taken in turn from ports (nil:
// any), so that ports are reused from one request to the next and across frontends.
func whoAnswersFrom(t *testing.T, client *lab.Pod, url string, n int, ports []int) map[string]int {
	t.Helper()
	seen := map[string]int{}
	for i := 0; i < n; i++ {
		port := 0
		if len(ports) > 0 {
			port = ports[i%len(ports)]
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		body, err := client.HTTPGetFrom(ctx, url, port)
		cancel()
		if err != nil {
			t.Fatalf("request %d to %s from port %d: %v", i, url, port, err)
		}
		// "hello from <name> on <node> (<ip>), client <address>"
		f := strings.Fields(body)
		if len(f) < 3 {
			t.Fatalf("unexpected answer %q", body)
		}
		seen[f[2]]++
	}
	return seen
}

func TestServiceLifecycleAndEndpointChurn(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	const ns = "e2e-lifecycle"
	c := l.Client()
	app := map[string]string{"app": "web"}

	// Three backends over two nodes. The named target port "http" is 8080 on two pods and
	// 9090 on the third: the EndpointSlice controller resolves it per pod.
	pods := map[string]*lab.Pod{}
	for i, spec := range []struct {
		node string
		port int
	}{{"node-1", 8080}, {"node-2", 8080}, {"node-1", 9090}} {
		name := fmt.Sprintf("web-%d", i)
		p, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: name, Node: spec.node, Labels: app, HTTPPort: spec.port})
		if err != nil {
			t.Fatal(err)
		}
		pods[name] = p
	}
	client, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "client", Node: "node-2"})
	if err != nil {
		t.Fatal(err)
	}

	svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: app, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("http"), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := netip.MustParseAddr(svc.Spec.ClusterIP)
	front := netip.AddrPortFrom(vip, 80)
	ep := func(p *lab.Pod, port int) string { return netip.AddrPortFrom(p.IP, uint16(port)).String() }
	onEveryNode(t, l, front, "TCP", []string{ep(pods["web-0"], 8080), ep(pods["web-1"], 8080), ep(pods["web-2"], 9090)})
	// The client uses 32 fixed source ports once each, and again towards the new port below,
	// as a busy client's kernel reuses ports across destinations (never towards the same
	// one while its own TIME_WAIT holds the tuple: connect refuses that). The backends then
	// hold those tuples in TIME_WAIT or closing when the same ports come towards the new
	// frontend and land on the same backend (each does with p = 1/3, so all 32 missing
	// has p = (2/3)^32 < 3e-6).
	var reused []int
	for p := 41001; p <= 41032; p++ {
		reused = append(reused, p)
	}
	seen := whoAnswersFrom(t, client, "http://"+front.String()+"/", len(reused), reused)
	if len(seen) != 3 {
		t.Fatalf("%d requests through %s were answered by %v, want all three backends", len(reused), front, seen)
	}
	t.Logf("created: %s answered by %v", front, seen)

	// Update: the Service moves to port 8000; port 80 goes away on every node.
	svc.Spec.Ports[0].Port = 8000
	if _, err := c.CoreV1().Services(ns).Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	front8000 := netip.AddrPortFrom(vip, 8000)
	onEveryNode(t, l, front, "TCP", nil)
	onEveryNode(t, l, front8000, "TCP", []string{ep(pods["web-0"], 8080), ep(pods["web-1"], 8080), ep(pods["web-2"], 9090)})
	// The same source ports towards the new frontend land on the same backends while the
	// old flows' tuples are closing: the datapath gives those flows another wire port
	// (docs/architecture.md), so no request may fail.
	snatBefore := datapathCount(t, client.Node, loader.ReasonSvcPortSNAT)
	if seen := whoAnswersFrom(t, client, "http://"+front8000.String()+"/", len(reused), reused); len(seen) == 0 {
		t.Fatal("no answer on the updated port")
	}
	// The case must really have happened, or this proves nothing.
	if got := datapathCount(t, client.Node, loader.ReasonSvcPortSNAT) - snatBefore; got == 0 {
		t.Fatal("no flow needed another wire port: the reused-tuple case was not exercised")
	} else {
		t.Logf("%d packets of flows through the new port took another wire port", got)
	}

	// Pod churn: one backend goes, one comes; the EndpointSlices follow and so do the maps.
	if err := l.DeletePod(ctx, pods["web-0"]); err != nil {
		t.Fatal(err)
	}
	web3, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "web-3", Node: "node-2", Labels: app, HTTPPort: 8080})
	if err != nil {
		t.Fatal(err)
	}
	onEveryNode(t, l, front8000, "TCP", []string{ep(pods["web-1"], 8080), ep(pods["web-2"], 9090), ep(web3, 8080)})
	seen = whoAnswers(t, client, "http://"+front8000.String()+"/", 30)
	if seen["web-0"] != 0 || seen["web-3"] == 0 || len(seen) != 3 {
		t.Fatalf("after churn the answers came from %v, want web-1, web-2, web-3 and never web-0", seen)
	}
	t.Logf("after churn: %v", seen)

	// A pod that is running but not Ready is no backend. A ready pod started after it is
	// the barrier: the agent's EndpointSlice watch delivers events in order, so once the
	// ready one is a backend the not-ready one has been seen (and left out).
	if _, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "web-unready", Node: "node-1", Labels: app,
		HTTPPort: 8080, NotReady: true}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "the not-ready pod in the EndpointSlice", func() (bool, string) {
		sl, err := c.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=web"})
		if err != nil {
			return false, err.Error()
		}
		for _, s := range sl.Items {
			for _, e := range s.Endpoints {
				if e.TargetRef != nil && e.TargetRef.Name == "web-unready" {
					return true, ""
				}
			}
		}
		return false, fmt.Sprintf("%d slices without web-unready", len(sl.Items))
	})
	web4, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "web-4", Node: "node-2", Labels: app, HTTPPort: 8080})
	if err != nil {
		t.Fatal(err)
	}
	onEveryNode(t, l, front8000, "TCP", []string{ep(pods["web-1"], 8080), ep(pods["web-2"], 9090), ep(web3, 8080), ep(web4, 8080)})

	// Deletion removes the frontend everywhere.
	if err := c.CoreV1().Services(ns).Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	onEveryNode(t, l, front8000, "TCP", nil)
}
