//go:build linux

package kube_test

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policymap"
	"github.com/tern-net/tern/test/lab"
)

// nodeMaps reads one node's pinned datapath maps (read-only), to tell when its agent has
// written what the cluster's state compiles to: the condition the policy tests wait for
// before they send traffic, and the end of a latency measurement.
type nodeMaps struct {
	node              *lab.Node
	addrs             []netip.Addr // the node's InternalIPs (always allowed: IdentityHost)
	dp                *loader.Maps
	rules, iso, cidrs *ebpf.Map
}

func openNodeMaps(t testing.TB, ctx context.Context, l *lab.Lab) []*nodeMaps {
	t.Helper()
	var out []*nodeMaps
	for _, n := range l.Nodes() {
		dp, err := loader.OpenPinnedMaps(n.PinRoot())
		if err != nil {
			t.Fatal(err)
		}
		v := &nodeMaps{node: n, dp: dp}
		t.Cleanup(dp.Close)
		for _, m := range []struct {
			dst  **ebpf.Map
			name string
		}{{&v.rules, loader.PodMapTernPolicy}, {&v.iso, loader.PodMapTernPolicyIsolation}, {&v.cidrs, loader.PodMapTernPolicyCidrs}} {
			pm, err := ebpf.LoadPinnedMap(filepath.Join(n.PinRoot(), m.name), &ebpf.LoadPinOptions{ReadOnly: true})
			if err != nil {
				t.Fatalf("open %s of %s: %v", m.name, n.Name, err)
			}
			t.Cleanup(func() { pm.Close() })
			*m.dst = pm
		}
		obj, err := l.Client().CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range obj.Status.Addresses {
			if ip, err := netip.ParseAddr(a.Address); err == nil && ip.Is4() {
				v.addrs = append(v.addrs, ip)
			}
		}
		out = append(out, v)
	}
	return out
}

// clusterPolicy is the cluster's policy state as an agent compiles it (agent/kube/policy.go:
// every pod that is not host-network and not finished, every namespace, every policy in
// namespace/name order) and which node each pod runs on.
type clusterPolicy struct {
	state  policy.State
	nodeOf map[string]string // namespace/name -> node
}

func readClusterPolicy(ctx context.Context, c kubernetes.Interface) (*clusterPolicy, error) {
	cp := &clusterPolicy{nodeOf: map[string]string{}}
	pods, err := c.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	for _, p := range pods.Items {
		if p.Spec.HostNetwork || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		cp.state.Pods = append(cp.state.Pods, p)
		cp.nodeOf[p.Namespace+"/"+p.Name] = p.Spec.NodeName
	}
	nss, err := c.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	cp.state.Namespaces = nss.Items
	nps, err := c.NetworkingV1().NetworkPolicies("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	cp.state.Policies = nps.Items
	slices.SortFunc(cp.state.Policies, func(a, b networkingv1.NetworkPolicy) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	return cp, nil
}

// nodeWant is what one node's maps must hold for a cluster state.
type nodeWant struct {
	entries policymap.Entries
	ipcache map[netip.Addr]policy.Identity
}

func (cp *clusterPolicy) want(v *nodeMaps) (*nodeWant, error) {
	st := cp.state
	st.NodeAddrs = v.addrs
	d, err := policy.Compile(st)
	if err != nil {
		return nil, fmt.Errorf("compile the cluster's state for %s: %w", v.node.Name, err)
	}
	local := map[policy.Identity]bool{}
	for nn, id := range d.PodIdentity {
		if cp.nodeOf[nn.String()] == v.node.Name {
			local[id] = true
		}
	}
	return &nodeWant{entries: policymap.Encode(d, policymap.Options{Local: func(id policy.Identity) bool { return local[id] }}),
		ipcache: d.IPCache}, nil
}

func dumpMap[K comparable, V any](m *ebpf.Map) (map[K]V, error) {
	out := map[K]V{}
	var (
		k K
		v V
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	return out, it.Err()
}

// holds tells whether the node's maps are w: the three policy maps (rule keys), every pod
// address's ipcache identity, and every local endpoint's identity with enforcement on.
func (v *nodeMaps) holds(w *nodeWant) (bool, string) {
	rules, err := dumpMap[loader.PolicyKey, loader.PolicyValue](v.rules)
	if err != nil {
		return false, err.Error()
	}
	// Keys only: a value names the policy that produced the entry by the agent's slot number
	// (policy.Compiler), which a whole compile numbers differently; it does not change a
	// verdict. policy's TestIncrementalMatchesWhole compares the names.
	if len(rules) != len(w.entries.Rules) {
		return false, fmt.Sprintf("%s: tern_policy has %d entries, want %d", v.node.Name, len(rules), len(w.entries.Rules))
	}
	for k := range w.entries.Rules {
		if _, ok := rules[k]; !ok {
			return false, fmt.Sprintf("%s: tern_policy lacks %+v", v.node.Name, k)
		}
	}
	iso, err := dumpMap[uint32, loader.PolicyIsoValue](v.iso)
	if err != nil {
		return false, err.Error()
	}
	if !maps.Equal(iso, w.entries.Isolation) {
		return false, fmt.Sprintf("%s: tern_policy_isolation %v, want %v", v.node.Name, iso, w.entries.Isolation)
	}
	cidrs, err := dumpMap[loader.PolicyCIDRKey, loader.PolicyCIDRValue](v.cidrs)
	if err != nil {
		return false, err.Error()
	}
	if !maps.Equal(cidrs, w.entries.CIDRs) {
		return false, fmt.Sprintf("%s: tern_policy_cidrs has %d entries, want %d", v.node.Name, len(cidrs), len(w.entries.CIDRs))
	}
	for a, id := range w.ipcache {
		var got loader.IPCacheValue
		if err := v.dp.IPCache.Lookup(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(a)}, &got); err != nil || got.Identity != uint32(id) {
			return false, fmt.Sprintf("%s: ipcache %s has identity %d, want %d", v.node.Name, a, got.Identity, id)
		}
	}
	eps, err := dumpMap[loader.EndpointKey, loader.EndpointValue](v.dp.Endpoints)
	if err != nil {
		return false, err.Error()
	}
	for _, e := range eps {
		a := loader.BEToAddr(e.Addr)
		if id, ok := w.ipcache[a]; ok && (e.Identity != uint32(id) || e.Flags&loader.EndpointFlagPolicy == 0) {
			return false, fmt.Sprintf("%s: endpoint %s has identity %d flags %#x, want %d with policy on", v.node.Name, a, e.Identity, e.Flags, id)
		}
	}
	return true, ""
}

// waitPolicyMaps waits (bounded) until every node's maps hold what the apiserver's current
// state compiles to. It polls the maps every millisecond: reading a few small maps costs
// microseconds.
func waitPolicyMaps(ctx context.Context, l *lab.Lab, views []*nodeMaps, timeout time.Duration) error {
	cp, err := readClusterPolicy(ctx, l.Client())
	if err != nil {
		return err
	}
	var wants []*nodeWant
	for _, v := range views {
		w, err := cp.want(v)
		if err != nil {
			return err
		}
		wants = append(wants, w)
	}
	deadline := time.Now().Add(timeout)
	for {
		ok, why := true, ""
		for i, v := range views {
			if ok, why = v.holds(wants[i]); !ok {
				break
			}
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the agents' policy maps do not hold the cluster's state after %s: %s", timeout, why)
		}
		time.Sleep(time.Millisecond)
	}
}

// policyDrops sums the drop_policy counters of every node.
func policyDrops(views []*nodeMaps) (uint64, error) {
	var n uint64
	for _, v := range views {
		tot, err := v.dp.MetricsTotals()
		if err != nil {
			return 0, err
		}
		for k, c := range tot {
			if k.Reason == loader.ReasonDropPolicy {
				n += c.Packets
			}
		}
	}
	return n, nil
}
