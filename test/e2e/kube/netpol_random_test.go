//go:build linux

package kube_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/tern-net/tern/policy/policytest"
	"github.com/tern-net/tern/policy/simulate"
	"github.com/tern-net/tern/test/lab"
)

// labScenarios is how many random scenarios TestSimulatorAgreesWithLab runs. Each costs a
// few seconds of real traffic (a denied probe is a 2 s connect timeout), so the lab runs
// fewer than the 150 the simulator test compares with the reference.
const labScenarios = 12

// TestSimulatorAgreesWithLab: six pods in three namespaces on two nodes, then random
// scenarios (pod labels, namespace labels, policies: policytest.RandomOver) applied to the
// real apiserver at run time. For each, the simulator decides 20 TCP probes offline, and the
// live datapath must come to the same truth table (waited for, bounded, then checked once
// more); the reference evaluator must agree with the simulator too.
func TestSimulatorAgreesWithLab(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	c := l.Client()
	namespaces := []string{"sim-0", "sim-1", "sim-2"}
	live := map[string]*lab.Pod{}
	for i := range 6 {
		ns := namespaces[i%3]
		http := int32(80)
		if i%2 == 1 {
			http = 8080
		}
		p, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: fmt.Sprintf("p%d", i), Node: fmt.Sprintf("node-%d", 1+i%2),
			Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: http}}})
		if err != nil {
			t.Fatal(err)
		}
		for _, port := range []int{80, 8080} {
			if _, err := p.Serve(port); err != nil {
				t.Fatal(err)
			}
		}
		live[p.Key()] = p
	}
	var pods []corev1.Pod
	for _, p := range live {
		obj, err := c.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, *obj)
	}
	defer func() {
		for _, ns := range namespaces {
			_ = c.NetworkingV1().NetworkPolicies(ns).DeleteCollection(context.WithoutCancel(ctx), metav1.DeleteOptions{}, metav1.ListOptions{})
		}
	}()
	sim, err := simulate.New()
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()

	allowed, denied := 0, 0
	defer func() { t.Logf("%d probes agree (%d allowed, %d denied)", allowed+denied, allowed, denied) }()
	for seed := uint64(1); seed <= labScenarios; seed++ {
		sc := policytest.RandomOver(seed, pods, []uint16{80, 8080}, 20)
		var probes []simulate.Probe
		for _, p := range sc.Probes {
			probes = append(probes, simulate.Probe{From: p.From, To: p.To, Port: int(p.Port), Protocol: p.Protocol})
		}
		want, err := sim.Run(sc.State, probes)
		if err != nil {
			t.Fatalf("seed %d: simulate: %v", seed, err)
		}
		ref, err := policytest.Reference(&sc)
		if err != nil {
			t.Fatal(err)
		}
		for i := range want {
			if want[i].Allowed != ref[i].Allowed() {
				t.Fatalf("seed %d probe %d: simulator %v, reference %v", seed, i, want[i].Allowed, ref[i].Allowed())
			}
		}
		applyScenario(t, ctx, l, namespaces, &sc)
		table := func() (bool, string) {
			got := make([]bool, len(probes))
			var wg sync.WaitGroup
			for i, p := range probes {
				wg.Add(1)
				go func() {
					defer wg.Done()
					dst := live[p.To]
					got[i] = reaches(ctx, live[p.From], netip.AddrPortFrom(dst.IP, uint16(p.Port)).String())
				}()
			}
			wg.Wait()
			var bad []string
			for i, w := range want {
				if got[i] != w.Allowed {
					bad = append(bad, fmt.Sprintf("%s -> %s:%d live %v, simulator %v", w.From, w.To, w.Port, got[i], w.Allowed))
				}
			}
			return len(bad) == 0, strings.Join(bad, "; ")
		}
		what := fmt.Sprintf("seed %d: live datapath matches the simulator", seed)
		eventually(t, 45*time.Second, what, table)
		if ok, why := table(); !ok {
			pol, _ := json.Marshal(sc.State.Policies)
			t.Fatalf("%s: settled, then differed: %s\npolicies: %s", what, why, pol)
		}
		for _, w := range want {
			if w.Allowed {
				allowed++
			} else {
				denied++
			}
		}
	}
}

// applyScenario makes the cluster hold sc: its namespace and pod labels (keys it does not
// set are removed) and exactly its policies.
func applyScenario(t *testing.T, ctx context.Context, l *lab.Lab, namespaces []string, sc *policytest.Scenario) {
	t.Helper()
	c := l.Client()
	for _, ns := range namespaces {
		if err := c.NetworkingV1().NetworkPolicies(ns).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	labels := func(keys []string, set map[string]string) []byte {
		m := map[string]any{}
		for _, k := range keys {
			m[k] = nil
		}
		for k, v := range set {
			m[k] = v
		}
		b, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": m}})
		return b
	}
	for _, ns := range sc.State.Namespaces {
		if _, err := c.CoreV1().Namespaces().Patch(ctx, ns.Name, types.MergePatchType, labels([]string{"team", "env"}, ns.Labels), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range sc.State.Pods {
		if _, err := c.CoreV1().Pods(p.Namespace).Patch(ctx, p.Name, types.MergePatchType, labels([]string{"app", "tier"}, p.Labels), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, np := range sc.State.Policies {
		np := np.DeepCopy()
		np.ResourceVersion = ""
		if _, err := c.NetworkingV1().NetworkPolicies(np.Namespace).Create(ctx, np, metav1.CreateOptions{}); err != nil {
			t.Fatalf("seed %d: create networkpolicy %s/%s: %v", sc.Seed, np.Namespace, np.Name, err)
		}
	}
}
