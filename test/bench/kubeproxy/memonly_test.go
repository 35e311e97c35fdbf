package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/test/k8s/controlplane"
	"github.com/tern-net/tern/test/lab"
)

// TestMemoryOnlyEtcdFill runs -fill etcd and -memory-only in a real lab at two small sizes:
// the fillers written straight into etcd must reach the API as valid Services with unique
// cluster IPs, each held by its IPAddress (so the sentinels created through the API later
// get other addresses), every proxy must serve the sentinel after them, and each -agent
// binary must be restarted and read once per repetition, with a heap profile saved.
func TestMemoryOnlyEtcdFill(t *testing.T) {
	testutil.RequirePrivileged(t)
	if _, err := controlplane.BinDir(); err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	built := t.TempDir()
	if err := lab.BuildBinaries(ctx, built); err != nil {
		t.Fatal(err)
	}
	agents := agentVariants{{label: "a", path: filepath.Join(built, "tern-agent")}, {label: "b", path: filepath.Join(built, "tern-agent")}}
	p := params{sizes: []int{20, 60}, reps: 2, workers: 4, convergeTimeout: 2 * time.Minute,
		fill: fillEtcd, memoryOnly: true, agents: agents, settle: 200 * time.Millisecond, heapDir: t.TempDir()}
	binDir, cleanup, err := labBinDir(built, agents)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	b, err := setup(ctx, p, binDir, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := b.Close(); err != nil {
			t.Error(err)
		}
	}()
	res := newResults(p)
	for _, size := range p.sizes {
		if _, _, err := b.grow(ctx, size); err != nil {
			t.Fatal(err)
		}
		if err := b.memoryReps(ctx, size, res); err != nil {
			t.Fatal(err)
		}
	}

	// Every Service of the cluster has a cluster IP of its own, held by an IPAddress that
	// names it.
	svcs, err := b.client.CoreV1().Services(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ips, err := b.client.NetworkingV1().IPAddresses().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	owner := map[string]string{}
	for _, ip := range ips.Items {
		if ip.Spec.ParentRef != nil {
			owner[ip.Name] = ip.Spec.ParentRef.Namespace + "/" + ip.Spec.ParentRef.Name
		}
	}
	seen := map[string]string{}
	fillers := 0
	for _, s := range svcs.Items {
		key := s.Namespace + "/" + s.Name
		if s.Namespace == fillNS {
			fillers++
		}
		if prev, ok := seen[s.Spec.ClusterIP]; ok {
			t.Errorf("%s and %s share cluster IP %s", prev, key, s.Spec.ClusterIP)
		}
		seen[s.Spec.ClusterIP] = key
		if owner[s.Spec.ClusterIP] != key {
			t.Errorf("%s's cluster IP %s is held by IPAddress of %q", key, s.Spec.ClusterIP, owner[s.Spec.ClusterIP])
		}
	}
	if fillers != b.fillers || fillers == 0 {
		t.Errorf("the API lists %d fillers, the bench wrote %d", fillers, b.fillers)
	}
	slices, err := b.client.DiscoveryV1().EndpointSlices(fillNS).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(slices.Items) != b.fillers {
		t.Errorf("the API lists %d filler EndpointSlices, want %d", len(slices.Items), b.fillers)
	}

	if want := len(p.sizes) * p.reps * len(agents); len(res.MemRuns) != want {
		t.Fatalf("%d memory readings, want %d", len(res.MemRuns), want)
	}
	count := map[string]int{}
	for _, m := range res.MemRuns {
		count[m.Agent]++
		for _, name := range []string{"tern agent", "tern agent peak", "kube-proxy iptables", "kube-proxy nftables"} {
			if m.MB[name] < 5 {
				t.Errorf("%d Services, rep %d, agent %s: %s %.1f MB is not a live process's", m.Services, m.Rep, m.Agent, name, m.MB[name])
			}
		}
		if m.MB["tern agent peak"] < m.MB["tern agent"] {
			t.Errorf("peak %.1f MB below RSS %.1f MB", m.MB["tern agent peak"], m.MB["tern agent"])
		}
		fi, err := os.Stat(filepath.Join(p.heapDir, fmt.Sprintf("heap-%d-%s-%d.pb.gz", m.Services, m.Agent, m.Rep+1)))
		if err != nil || fi.Size() == 0 {
			t.Errorf("heap profile of %d Services, agent %s, rep %d: %v", m.Services, m.Agent, m.Rep+1, err)
		}
	}
	if count["a"] != len(p.sizes)*p.reps || count["b"] != len(p.sizes)*p.reps {
		t.Errorf("readings per agent: %v", count)
	}
	md := res.memoryMarkdown()
	for _, row := range []string{"| 60 | a |", "| 60 | b |"} {
		if !strings.Contains(md, row) {
			t.Errorf("memory table lacks a row starting %q:\n%s", row, md)
		}
	}
	t.Log("\n" + md)
}
