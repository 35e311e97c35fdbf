//go:build linux

package kube_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
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

// labScenarios is how many random scenarios TestSimulatorAgreesWithLab runs (acceptance:
// at least 100). Each costs about one probeTimeout of wall time: the maps are waited for,
// not the traffic, and the probes of a scenario run at once.
const labScenarios = 100

// TestSimulatorAgreesWithLab: six pods in three namespaces on two nodes, each serving TCP,
// UDP and SCTP (labServices), then labScenarios random scenarios (pod labels, namespace
// labels, policies: policytest.RandomOver) applied in sequence to the real apiserver, the
// same pods throughout. For each scenario:
//  1. the simulator (real compiler, real BPF programs over private maps) decides every
//     ordered pair of distinct pods on every service (180 probes), and the reference
//     evaluator must agree with it probe by probe;
//  2. the scenario is written to the apiserver, and the test waits until both agents' maps
//     hold what the apiserver's state compiles to (a condition on the pinned maps, bounded;
//     no traffic is sent before);
//  3. all 180 probes run at once, each once, from a fresh source port, bounded by
//     probeTimeout;
//  4. the nodes' drop_policy counters must have risen by exactly the number of unanswered
//     probes (every timeout was a policy drop, and no answered probe was dropped), and the
//     live truth table must equal the simulator's.
func TestSimulatorAgreesWithLab(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := l.Client()
	namespaces := []string{"sim-0", "sim-1", "sim-2"}
	live := map[string]*lab.Pod{}
	echoes := map[netip.AddrPort]*udpEcho{}
	for i := range 6 {
		ns := namespaces[i%3]
		http := int32(80)
		if i%2 == 1 {
			http = 8080
		}
		// Named ports differ per pod: "http" is 80 or 8080, "dns" and "sctp" only on some.
		ports := []corev1.ContainerPort{{Name: "http", ContainerPort: http}}
		if i%2 == 0 {
			ports = append(ports, corev1.ContainerPort{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP})
		}
		if i%3 != 0 {
			ports = append(ports, corev1.ContainerPort{Name: "sctp", ContainerPort: 9000, Protocol: corev1.ProtocolSCTP})
		}
		p, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: fmt.Sprintf("p%d", i), Node: fmt.Sprintf("node-%d", 1+i%2), Ports: ports})
		if err != nil {
			t.Fatal(err)
		}
		stop, err := serveServices(p, labServices, echoes)
		if err != nil {
			t.Fatal(err)
		}
		defer stop()
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
	slices.SortFunc(pods, func(a, b corev1.Pod) int { return strings.Compare(a.Name, b.Name) })
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
	views := openNodeMaps(t, ctx, l)
	ports := newSourcePorts()

	var allowed, denied int
	var slowest time.Duration
	perProto := map[string][2]int{}
	start := time.Now()
	defer func() {
		late := 0
		for _, e := range echoes {
			late += e.lateAnswers()
		}
		t.Logf("%d scenarios, %d probes agree (%d allowed, %d denied; by protocol [allowed denied]: %v) in %s; slowest allowed probe %s; UDP echoes the server sent after the probe's bound: %d",
			labScenarios, allowed+denied, allowed, denied, perProto, time.Since(start).Round(time.Millisecond), slowest, late)
	}()
	// Seed 0 is no policy at all: every probe allowed (this also resolves every neighbour
	// on the way before the first timed scenario).
	for seed := uint64(0); seed <= labScenarios; seed++ {
		sc := policytest.RandomOver(seed, pods, labServices, 0)
		if seed == 0 {
			sc.State.Policies = nil
		}
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
				t.Fatalf("seed %d probe %+v: simulator %v, reference %v", seed, probes[i], want[i].Allowed, ref[i].Allowed())
			}
		}
		applyScenario(t, ctx, l, namespaces, &sc)
		if err := waitPolicyMaps(ctx, l, views, 30*time.Second); err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		drops0, err := policyDrops(views)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]bool, len(probes))
		took := make([]time.Duration, len(probes))
		errs := make([]error, len(probes))
		var wg sync.WaitGroup
		for i, p := range probes {
			src, err := ports.take()
			if err != nil {
				t.Fatal(err)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				t0 := time.Now()
				got[i], errs[i] = probeVia(ctx, live[p.From], live[p.To].IP, p.Protocol, uint16(p.Port), src, echoes)
				took[i] = time.Since(t0)
			}()
		}
		wg.Wait()
		drops1, err := policyDrops(views)
		if err != nil {
			t.Fatal(err)
		}
		var bad []string
		nDenied := 0
		for i, w := range want {
			if errs[i] != nil {
				bad = append(bad, errs[i].Error())
				continue
			}
			if got[i] != w.Allowed {
				bad = append(bad, fmt.Sprintf("%s %s -> %s:%d live %v, simulator %v (egress %v, ingress %v)",
					w.Protocol, w.From, w.To, w.Port, got[i], w.Allowed, w.Egress, w.Ingress))
			}
			pp := perProto[w.Protocol]
			if w.Allowed {
				pp[0]++
				slowest = max(slowest, took[i])
			} else {
				pp[1]++
				nDenied++
			}
			perProto[w.Protocol] = pp
		}
		liveDenied := 0
		for i := range got {
			if errs[i] == nil && !got[i] {
				liveDenied++
			}
		}
		if drops1-drops0 != uint64(liveDenied) {
			t.Fatalf("seed %d: %d probes saw no answer but the nodes counted %d policy drops: a probe was lost or too slow without being denied, or an allowed flow was dropped (%d disagree with the simulator: %s)",
				seed, liveDenied, drops1-drops0, len(bad), strings.Join(bad, "; "))
		}
		if len(bad) > 0 {
			pol, _ := json.Marshal(sc.State.Policies)
			t.Fatalf("seed %d: the live datapath differs from the simulator on %d of %d probes:\n%s\npolicies: %s",
				seed, len(bad), len(probes), strings.Join(bad, "\n"), pol)
		}
		allowed += len(want) - nDenied
		denied += nDenied
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
