package policy_test

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policytest"
)

// sameDesired compares an incremental result with a whole compile: every map equal, rule
// values compared by the policy they name (the two number policies differently).
func sameDesired(inc, full *policy.Desired) error {
	for _, c := range []struct {
		name string
		eq   bool
	}{
		{"Shapes", maps.Equal(inc.Shapes, full.Shapes)},
		{"Namespace", maps.Equal(inc.Namespace, full.Namespace)},
		{"PodIdentity", maps.Equal(inc.PodIdentity, full.PodIdentity)},
		{"IPCache", maps.Equal(inc.IPCache, full.IPCache)},
		{"CIDRs", maps.Equal(inc.CIDRs, full.CIDRs)},
		{"Isolation", maps.Equal(inc.Isolation, full.Isolation)},
	} {
		if !c.eq {
			return fmt.Errorf("%s differ", c.name)
		}
	}
	if len(inc.Rules) != len(full.Rules) {
		return fmt.Errorf("%d rules, whole compile %d", len(inc.Rules), len(full.Rules))
	}
	for k, v := range full.Rules {
		iv, ok := inc.Rules[k]
		if !ok {
			return fmt.Errorf("rule %+v (from %s) missing", k, full.Policies[v])
		}
		if inc.Policies[iv] != full.Policies[v] {
			return fmt.Errorf("rule %+v names %s, whole compile %s", k, inc.Policies[iv], full.Policies[v])
		}
	}
	// The isolators (which policy a denial is attributed to) and the selecting policies.
	if len(inc.IsolatedBy) != len(full.IsolatedBy) {
		return fmt.Errorf("%d isolators, whole compile %d", len(inc.IsolatedBy), len(full.IsolatedBy))
	}
	for k, v := range full.IsolatedBy {
		iv, ok := inc.IsolatedBy[k]
		if !ok || inc.Policies[iv] != full.Policies[v] {
			return fmt.Errorf("isolator %+v: %q (%v), whole compile %s", k, inc.Policies[iv], ok, full.Policies[v])
		}
	}
	if len(inc.Selecting) != len(full.Selecting) {
		return fmt.Errorf("%d selected identities, whole compile %d", len(inc.Selecting), len(full.Selecting))
	}
	for id, fs := range full.Selecting {
		is := inc.Selecting[id]
		if len(is) != len(fs) {
			return fmt.Errorf("identity %d: selected by %d policies, whole compile %d", id, len(is), len(fs))
		}
		for i := range fs {
			if inc.Policies[is[i]] != full.Policies[fs[i]] {
				return fmt.Errorf("identity %d: selecting policy %d is %s, whole compile %s", id, i, inc.Policies[is[i]], full.Policies[fs[i]])
			}
		}
	}
	return nil
}

// TestIncrementalMatchesWhole: random clusters changed one object at a time (a pod's
// labels, a namespace's labels, a pod added or removed, a policy added, replaced or
// deleted); after every change the incremental compiler's maps must equal a whole compile
// of the same state.
func TestIncrementalMatchesWhole(t *testing.T) {
	changes := 0
	for seed := uint64(1); seed <= 60; seed++ {
		sc := policytest.Random(seed, 0)
		donor := policytest.Random(seed+1000, 0) // labels and policies to change to
		r := rand.New(rand.NewPCG(seed, 7))
		st := sc.State
		c, d, _ := policy.CompileIncremental(st)
		check := func(what string) {
			t.Helper()
			full := st
			full.Policies = slices.Clone(st.Policies)
			slices.SortFunc(full.Policies, func(a, b networkingv1.NetworkPolicy) int {
				return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
			})
			want, werr := policy.Compile(full)
			got, gerr := c.Desired()
			if (werr == nil) != (gerr == nil) {
				t.Fatalf("seed %d after %s: errors differ: whole %v, incremental %v", seed, what, werr, gerr)
			}
			if err := sameDesired(got, want); err != nil {
				t.Fatalf("seed %d after %s: %v", seed, what, err)
			}
			changes++
		}
		_ = d
		check("the initial state")
		for step := range 25 {
			switch r.IntN(6) {
			case 0: // a pod's labels
				if len(st.Pods) == 0 {
					continue
				}
				i := r.IntN(len(st.Pods))
				p := st.Pods[i].DeepCopy()
				p.Labels = donor.State.Pods[r.IntN(len(donor.State.Pods))].Labels
				st.Pods = slices.Clone(st.Pods)
				st.Pods[i] = *p
				c.SetPod(p)
				check(fmt.Sprintf("step %d: pod %s/%s relabelled %v", step, p.Namespace, p.Name, p.Labels))
			case 1: // a namespace's labels
				i := r.IntN(len(st.Namespaces))
				ns := st.Namespaces[i].DeepCopy()
				ns.Labels = donor.State.Namespaces[r.IntN(len(donor.State.Namespaces))].Labels
				st.Namespaces = slices.Clone(st.Namespaces)
				st.Namespaces[i] = *ns
				c.SetNamespace(ns)
				check(fmt.Sprintf("step %d: namespace %s relabelled %v", step, ns.Name, ns.Labels))
			case 2: // a pod leaves
				if len(st.Pods) == 0 {
					continue
				}
				i := r.IntN(len(st.Pods))
				p := st.Pods[i]
				st.Pods = slices.Delete(slices.Clone(st.Pods), i, i+1)
				c.DeletePod(types.NamespacedName{Namespace: p.Namespace, Name: p.Name})
				check(fmt.Sprintf("step %d: pod %s/%s deleted", step, p.Namespace, p.Name))
			case 3: // a pod arrives (a donor's shape, a fresh name and address)
				p := donor.State.Pods[r.IntN(len(donor.State.Pods))].DeepCopy()
				p.Name = fmt.Sprintf("new%d", step)
				p.Status.PodIP = fmt.Sprintf("10.0.%d.%d", 3+step/200, 100+step)
				st.Pods = append(slices.Clone(st.Pods), *p)
				c.SetPod(p)
				check(fmt.Sprintf("step %d: pod %s/%s added", step, p.Namespace, p.Name))
			case 4: // a policy added or replaced (a donor's spec under a name of ours)
				np := donor.State.Policies[r.IntN(len(donor.State.Policies))].DeepCopy()
				np.Name = fmt.Sprintf("np%d", r.IntN(5))
				i := slices.IndexFunc(st.Policies, func(q networkingv1.NetworkPolicy) bool { return q.Namespace == np.Namespace && q.Name == np.Name })
				st.Policies = slices.Clone(st.Policies)
				if i >= 0 {
					st.Policies[i] = *np
				} else {
					st.Policies = append(st.Policies, *np)
				}
				c.SetPolicy(np)
				check(fmt.Sprintf("step %d: policy %s/%s set", step, np.Namespace, np.Name))
			case 5: // a policy deleted
				if len(st.Policies) == 0 {
					continue
				}
				i := r.IntN(len(st.Policies))
				np := st.Policies[i]
				st.Policies = slices.Delete(slices.Clone(st.Policies), i, i+1)
				c.DeletePolicy(types.NamespacedName{Namespace: np.Namespace, Name: np.Name})
				check(fmt.Sprintf("step %d: policy %s/%s deleted", step, np.Namespace, np.Name))
			}
		}
	}
	t.Logf("%d states compared", changes)
}

// TestIncrementalAddressReuse: an address reused by a new pod while the old pod's object
// lingers keeps the identity of a live claimant when either goes.
func TestIncrementalAddressReuse(t *testing.T) {
	c := policy.NewCompiler(nil)
	pod := func(name, app string) *corev1.Pod {
		p := &corev1.Pod{}
		p.Namespace, p.Name, p.Labels = "ns", name, map[string]string{"app": app}
		p.Status.PodIP = "10.0.0.9"
		return p
	}
	c.SetPod(pod("old", "a"))
	c.SetPod(pod("new", "b"))
	d, _ := c.Desired()
	addr := netip.MustParseAddr("10.0.0.9")
	newID := d.PodIdentity[types.NamespacedName{Namespace: "ns", Name: "new"}]
	if d.IPCache[addr] != newID {
		t.Fatalf("the address has identity %d, want the pod set last (%d)", d.IPCache[addr], newID)
	}
	c.DeletePod(types.NamespacedName{Namespace: "ns", Name: "old"})
	d, _ = c.Desired()
	if d.IPCache[addr] != newID {
		t.Fatalf("after the old pod left the address has identity %d, want the new pod's %d", d.IPCache[addr], newID)
	}
	c.DeletePod(types.NamespacedName{Namespace: "ns", Name: "new"})
	d, _ = c.Desired()
	if _, ok := d.IPCache[addr]; ok || len(d.Shapes) != 0 {
		t.Fatalf("after both left: ipcache %v, shapes %v", d.IPCache, d.Shapes)
	}
}
