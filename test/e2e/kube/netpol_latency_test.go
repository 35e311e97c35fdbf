//go:build linux

package kube_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policymap"
	"github.com/tern-net/tern/test/lab"
)

// BenchmarkPolicyChangeLatency measures, in the lab (real apiserver, two agents), the time
// from a write to the apiserver until every node's maps reflect it, b.N times each:
//   - label: a pod's labels change (a new identity): until every node's ipcache gives the
//     pod's address the new identity and the pod's own node has moved its endpoint to it
//     (the agent writes the identity's rules before it moves the endpoint);
//   - policy-add: a policy selecting both pods (one per node) is created: until each
//     node's tern_policy holds its local pod's new rule;
//   - policy-delete: that policy is deleted: until the rule is gone on both nodes.
//
// The clock starts before the API call and stops when a poll of the pinned maps (every
// millisecond, so ±1 ms) sees the change on every node. Run (make bench-policy):
//
//	TERN_PRIVILEGED=1 TERN_K8S_BIN_DIR=... go test ./test/e2e/kube -run '^$' -bench PolicyChangeLatency -benchtime 100x
func BenchmarkPolicyChangeLatency(b *testing.B) {
	l := getLab(b)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := l.Client()
	const ns = "np-latency"
	var pods []*lab.Pod
	for i, node := range []string{"node-1", "node-2"} {
		name := fmt.Sprintf("p%d", i)
		p := l.Pod(ns, name)
		if p == nil { // the benchmark function runs more than once on one lab
			var err error
			if p, err = l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: name, Node: node, Labels: map[string]string{"app": "lat"}}); err != nil {
				b.Fatal(err)
			}
		}
		pods = append(pods, p)
	}
	defer func() {
		_ = c.NetworkingV1().NetworkPolicies(ns).DeleteCollection(context.WithoutCancel(ctx), metav1.DeleteOptions{}, metav1.ListOptions{})
	}()
	views := openNodeMaps(b, ctx, l)
	viewOf := func(p *lab.Pod) *nodeMaps {
		for _, v := range views {
			if v.node == p.Node {
				return v
			}
		}
		b.Fatalf("no node view for %s", p.Key())
		return nil
	}
	if err := waitPolicyMaps(ctx, l, views, 30*time.Second); err != nil {
		b.Fatal(err)
	}
	cp, err := readClusterPolicy(ctx, c)
	if err != nil {
		b.Fatal(err)
	}
	// identities compiles the cluster's state (as of the last write) to every pod's identity.
	identities := func() map[types.NamespacedName]policy.Identity {
		d, err := policy.Compile(cp.state)
		if err != nil {
			b.Fatal(err)
		}
		return d.PodIdentity
	}
	setLabel := func(p *lab.Pod, v string) {
		for i := range cp.state.Pods {
			q := &cp.state.Pods[i]
			if q.Namespace == p.Namespace && q.Name == p.Name {
				q.Labels["rev"] = v
			}
		}
	}
	// until polls every millisecond until cond holds and returns the time since start.
	until := func(start time.Time, what string, cond func() bool) time.Duration {
		deadline := start.Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				b.Fatalf("%s: not in the maps after 10 s", what)
			}
			time.Sleep(time.Millisecond)
		}
		return time.Since(start)
	}
	var label, add, del []time.Duration
	b.ResetTimer()
	for i := range b.N {
		// Label change on one pod, alternating nodes.
		p := pods[i%2]
		rev := fmt.Sprintf("r%d", i)
		setLabel(p, rev)
		want := uint32(identities()[types.NamespacedName{Namespace: p.Namespace, Name: p.Name}])
		start := time.Now()
		relabelPod(b, ctx, l, p, "rev", rev)
		label = append(label, until(start, "label change of "+p.Key(), func() bool {
			for _, v := range views {
				var got loader.IPCacheValue
				if err := v.dp.IPCache.Lookup(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(p.IP)}, &got); err != nil || got.Identity != want {
					return false
				}
			}
			eps, err := dumpMap[loader.EndpointKey, loader.EndpointValue](viewOf(p).dp.Endpoints)
			if err != nil {
				return false
			}
			for _, e := range eps {
				if loader.BEToAddr(e.Addr) == p.IP {
					return e.Identity == want
				}
			}
			return false
		}))

		// A policy selecting both pods, allowing each from the other on a port of its own.
		ids := identities()
		port := int32(1000 + i)
		keys := map[*nodeMaps]loader.PolicyKey{}
		for j, q := range pods {
			other := pods[1-j]
			keys[viewOf(q)] = policymap.RuleKey(policy.RuleKey{Subject: ids[types.NamespacedName{Namespace: ns, Name: q.Name}],
				Peer: ids[types.NamespacedName{Namespace: ns, Name: other.Name}], Dir: policy.Ingress, Proto: 6, Port: uint16(port), PortBits: 16})
		}
		present := func(want bool) func() bool {
			return func() bool {
				for v, k := range keys {
					var val loader.PolicyValue
					err := v.rules.Lookup(k, &val)
					// An LPM lookup finds the longest covering entry; no other rule of these
					// pods covers the port, so a hit is this policy's entry.
					if (err == nil) != want {
						return false
					}
				}
				return true
			}
		}
		pp := intstr.FromInt32(port)
		np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "lat"},
			Spec: networkingv1.NetworkPolicySpec{
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "lat"}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Port: &pp}}}}}}
		start = time.Now()
		if _, err := c.NetworkingV1().NetworkPolicies(ns).Create(ctx, np, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		add = append(add, until(start, "policy create", present(true)))
		start = time.Now()
		if err := c.NetworkingV1().NetworkPolicies(ns).Delete(ctx, "lat", metav1.DeleteOptions{}); err != nil {
			b.Fatal(err)
		}
		del = append(del, until(start, "policy delete", present(false)))
	}
	b.StopTimer()
	for _, m := range []struct {
		name string
		d    []time.Duration
	}{{"label", label}, {"policy-add", add}, {"policy-delete", del}} {
		p50, p99, worst := percentiles(m.d)
		b.ReportMetric(float64(p50.Microseconds())/1000, m.name+"-p50-ms")
		b.ReportMetric(float64(p99.Microseconds())/1000, m.name+"-p99-ms")
		b.Logf("%s: %d changes, p50 %s, p99 %s, max %s", m.name, len(m.d), p50, p99, worst)
	}
}

// percentiles returns the 50th and 99th percentiles (nearest rank) and the maximum.
func percentiles(d []time.Duration) (p50, p99, worst time.Duration) {
	if len(d) == 0 {
		return 0, 0, 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	rank := func(q float64) time.Duration {
		i := int(q*float64(len(s))+0.999999) - 1
		return s[max(0, min(i, len(s)-1))]
	}
	return rank(0.50), rank(0.99), s[len(s)-1]
}
