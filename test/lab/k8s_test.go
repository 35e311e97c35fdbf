//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/test/k8s/controlplane"
	"github.com/tern-net/tern/test/lab"
)

// upKubernetes starts a Kubernetes lab; on failure the control plane's logs join the agents'.
func upKubernetes(t *testing.T, o lab.Options) *lab.Lab {
	t.Helper()
	testutil.RequirePrivileged(t)
	if _, err := controlplane.BinDir(); err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	o.Kubernetes = true
	l := up(t, o)
	t.Cleanup(func() {
		if !t.Failed() || l.ControlPlane() == nil {
			return
		}
		for _, f := range []string{"kube-apiserver.log", "kube-controller-manager.log"} {
			if b, err := os.ReadFile(filepath.Join(l.ControlPlane().DataDir(), f)); err == nil {
				if len(b) > 8000 {
					b = b[len(b)-8000:]
				}
				t.Logf("=== %s (tail) ===\n%s", f, b)
			}
		}
	})
	return l
}

// TestKubernetesServiceAcrossNodes runs the kubelet's part for a ClusterIP Service with
// three backends over two nodes and a client pod: every request through the ClusterIP is
// answered by a backend, all three answer, a deleted backend stops answering, and both
// agents report their Nodes' ENI addresses.
func TestKubernetesServiceAcrossNodes(t *testing.T) {
	l := upKubernetes(t, lab.Options{Nodes: 2})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	c := l.Client()
	const ns = "web"
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("http"), Protocol: corev1.ProtocolTCP},
			{Name: "echo", Port: 7, TargetPort: intstr.FromInt32(7777), Protocol: corev1.ProtocolTCP},
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := svc.Spec.ClusterIP

	backends := map[string]*lab.Pod{}
	for i := range 3 {
		p, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: fmt.Sprintf("web-%d", i), Node: l.Node(i % 2).Name,
			Labels: map[string]string{"app": "web"}, HTTPPort: 8080, ServePort: 7777})
		if err != nil {
			t.Fatal(err)
		}
		backends[p.Name] = p
		// The object carries the real UID the CNI saw, and the address tern gave.
		obj, err := c.CoreV1().Pods(ns).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if string(obj.UID) != p.UID || obj.Status.PodIP != p.IP.String() || obj.Spec.NodeName != p.Node.Name {
			t.Fatalf("pod object %s: uid %s ip %s node %s; lab has %s %s %s", p.Name, obj.UID, obj.Status.PodIP,
				obj.Spec.NodeName, p.UID, p.IP, p.Node.Name)
		}
	}
	client, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "client", Node: l.Node(1).Name})
	if err != nil {
		t.Fatal(err)
	}

	// ask sends requests through the ClusterIP until every name in want has answered;
	// an answer from anything else fails the test.
	ask := func(want map[string]bool) {
		t.Helper()
		seen := map[string]int{}
		deadline := time.Now().Add(30 * time.Second)
		for {
			body, err := client.HTTPGet(ctx, "http://"+vip+":80/")
			if err == nil {
				name := strings.Fields(body + " x x")[2]
				if !want[name] {
					t.Fatalf("answer %q from a pod that is not a current backend (want %v)", body, want)
				}
				seen[name]++
			}
			if len(seen) == len(want) {
				t.Logf("answers through %s:80: %v", vip, seen)
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("after 30s only %v answered through %s:80 (want %v; last error %v)", seen, vip, want, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	ask(map[string]bool{"web-0": true, "web-1": true, "web-2": true})

	// The TCP port of the same Service reaches the greeting server.
	greet, err := client.Ask(ctx, vip+":7", "ping")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(greet, ns+"/web-") {
		t.Fatalf("greeting through %s:7 is %q", vip, greet)
	}

	// A deleted backend stops answering once its endpoint is gone.
	if err := l.DeletePod(ctx, backends["web-2"]); err != nil {
		t.Fatal(err)
	}
	if l.Pod(ns, "web-2") != nil {
		t.Fatal("web-2 still listed after DeletePod")
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		ok := true
		for range 12 {
			body, err := client.HTTPGet(ctx, "http://"+vip+":80/")
			if err != nil || strings.Contains(body, "web-2") {
				ok = false
			}
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("web-2 still answers (or requests fail) 20s after its deletion")
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Both agents report their Node.
	for _, n := range l.Nodes() {
		for {
			node, err := c.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if node.Annotations["k8s.aliyun.com/allocated-eniips"] != "" && node.Annotations["k8s.aliyun.com/max-available-ip"] != "" {
				// The planning table's figure for the lab's ecs.g7.xlarge: (4 − 1) × 10.
				if got := node.Annotations["k8s.aliyun.com/max-available-ip"]; got != "30" {
					t.Errorf("%s: max-available-ip %q, want 30 for %s", n.Name, got, lab.DefaultInstanceType)
				}
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("%s has no IPAM annotations: %v", n.Name, node.Annotations)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}
