package policymap_test

import (
	"maps"
	"testing"

	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policymap"
	"github.com/tern-net/tern/policy/policytest"
)

// diff counts the entries that differ between two map contents: added, removed, or with
// another value.
func diff[K comparable, V comparable](a, b map[K]V) int {
	n := 0
	for k, v := range b {
		if old, ok := a[k]; !ok || old != v {
			n++
		}
	}
	for k := range a {
		if _, ok := b[k]; !ok {
			n++
		}
	}
	return n
}

func entriesDiff(a, b policymap.Entries) int {
	return diff(a.Rules, b.Rules) + diff(a.Isolation, b.Isolation) + diff(a.CIDRs, b.CIDRs)
}

// TestIncrementalWritesOnlyTheDifference: on 1,000 policies over 2,000 pods
// (policytest.BigState) the incremental compiler and the writer handle one change at a
// time — a pod's labels, a namespace's labels, a policy's port, a policy deleted — and:
//   - the compiler recompiles only the policies the change can affect;
//   - the writer, given only the subjects the compiler touched (SyncSubjects), writes
//     (puts and deletes) exactly the entries that differ, and the maps then hold exactly
//     the new contents;
//   - the numbers are compared with what a whole compile (policy.Compile, values numbered by
//     position) would make the writer write for the same change.
func TestIncrementalWritesOnlyTheDifference(t *testing.T) {
	testutil.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("1,000 policies")
	}
	dp, err := loader.LoadPrivate()
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	w, err := policymap.NewWriter(dp.PolicyMaps())
	if err != nil {
		t.Fatal(err)
	}
	st := policytest.BigState()
	c, d, err := policy.CompileIncremental(st)
	if err != nil {
		t.Fatal(err)
	}
	prev := policymap.Encode(d, policymap.Options{})
	s, err := w.Sync(prev)
	if err != nil {
		t.Fatal(err)
	}
	total := len(prev.Rules) + len(prev.Isolation) + len(prev.CIDRs)
	if s.Written != total || s.Deleted != 0 {
		t.Fatalf("first sync wrote %d and deleted %d, want %d written", s.Written, s.Deleted, total)
	}
	wholePrev := policymap.Encode(mustCompile(t, st), policymap.Options{})
	c.TakeTouched() // the full sync above wrote them

	port := intstr.FromInt32(7070)
	for _, ch := range []struct {
		name string
		// apply changes st and tells the compiler; maxRecompiled bounds the policies the
		// compiler may recompile.
		apply         func()
		maxRecompiled int
	}{
		{"one pod's labels (a new identity)", func() {
			p := &st.Pods[3]
			p.Labels = map[string]string{"app": p.Labels["app"], "tier": p.Labels["tier"], "canary": "yes"}
			c.SetPod(p)
		}, 200},
		{"one pod's labels (into an existing identity)", func() {
			p := &st.Pods[4]
			p.Labels = maps.Clone(st.Pods[3].Labels)
			c.SetPod(p)
		}, 0},
		{"one policy's port", func() {
			np := &st.Policies[10]
			np.Spec.Ingress[0].Ports[0].Port = &port
			c.SetPolicy(np)
		}, 1},
		{"one namespace's labels", func() {
			ns := &st.Namespaces[2]
			ns.Labels = map[string]string{"team": "t9"}
			c.SetNamespace(ns)
		}, 1000},
		{"one policy deleted", func() {
			np := st.Policies[500]
			st.Policies = append(st.Policies[:500:500], st.Policies[501:]...)
			c.DeletePolicy(types.NamespacedName{Namespace: np.Namespace, Name: np.Name})
		}, 0},
	} {
		ch.apply()
		d, err := c.Desired()
		if err != nil {
			t.Fatal(err)
		}
		if c.Recompiled() > ch.maxRecompiled {
			t.Errorf("%s: recompiled %d policies, want at most %d", ch.name, c.Recompiled(), ch.maxRecompiled)
		}
		next := policymap.Encode(d, policymap.Options{})
		want := entriesDiff(prev, next)
		touched := c.TakeTouched()
		s, err := w.SyncSubjects(d, c.RulesOf, touched, policymap.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if got := s.Written + s.Deleted; got != want {
			t.Errorf("%s: the writer wrote %d and deleted %d entries; %d differ", ch.name, s.Written, s.Deleted, want)
		}
		checkMaps(t, dp.PolicyMaps(), next)
		wholeNext := policymap.Encode(mustCompile(t, st), policymap.Options{})
		t.Logf("%s: %d policies recompiled, %d subjects rewritten, %d of %d entries written; a whole compile would have written %d",
			ch.name, c.Recompiled(), len(touched), want, total, entriesDiff(wholePrev, wholeNext))
		prev, wholePrev = next, wholeNext
	}
}

func mustCompile(t *testing.T, st policy.State) *policy.Desired {
	t.Helper()
	d, err := policy.Compile(st)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// checkMaps reads the three maps back and compares them with e.
func checkMaps(t *testing.T, pm *loader.PolicyMaps, e policymap.Entries) {
	t.Helper()
	rules := map[loader.PolicyKey]loader.PolicyValue{}
	var (
		rk loader.PolicyKey
		rv loader.PolicyValue
	)
	for it := pm.Rules.Iterate(); it.Next(&rk, &rv); {
		rules[rk] = rv
	}
	iso := map[uint32]loader.PolicyIsoValue{}
	var (
		ik uint32
		iv loader.PolicyIsoValue
	)
	for it := pm.Isolation.Iterate(); it.Next(&ik, &iv); {
		iso[ik] = iv
	}
	cidrs := map[loader.PolicyCIDRKey]loader.PolicyCIDRValue{}
	var (
		ck loader.PolicyCIDRKey
		cv loader.PolicyCIDRValue
	)
	for it := pm.CIDRs.Iterate(); it.Next(&ck, &cv); {
		cidrs[ck] = cv
	}
	for _, c := range []struct {
		name string
		ok   bool
		n, w int
	}{{"tern_policy", maps.Equal(rules, e.Rules), len(rules), len(e.Rules)},
		{"tern_policy_isolation", maps.Equal(iso, e.Isolation), len(iso), len(e.Isolation)},
		{"tern_policy_cidrs", maps.Equal(cidrs, e.CIDRs), len(cidrs), len(e.CIDRs)}} {
		if !c.ok {
			t.Fatalf("%s holds %d entries, not the %d wanted", c.name, c.n, c.w)
		}
	}
}
