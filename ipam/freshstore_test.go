package ipam

import (
	"os"
	"slices"
	"testing"
	"time"

	promtest "github.com/prometheus/client_golang/prometheus/testutil"
)

// TestEmptyStoreRecoversTheNodesENIsAtStart is a node that comes back with a new disk under
// the same instance (its system disk replaced, or the store deleted): the cloud still has the
// node's ENIs attached with their addresses, the store knows nothing. The new pool must take
// those ENIs at Start — before ListingGrace, which here is an hour — and serve pods from
// them, creating no ENI: a pool that waited would start empty and its refill would create
// ENIs for the slots its own ENIs hold (seen in the lab: a third ENI created, then
// EniPerInstanceLimitExceeded on every refill until the grace ran out).
func TestEmptyStoreRecoversTheNodesENIsAtStart(t *testing.T) {
	e := newEnv(t)
	e.grace = time.Hour
	cfg := eniConf(t, 0, 5, "vsw-test-a")

	p1, st1 := e.startPool(bigNode, cfg)
	allocateAll(t, p1, 0, 25) // 20 addresses per ENI: two ENIs
	var enis []string
	for _, es := range p1.Status().ENIs {
		enis = append(enis, es.ID)
	}
	slices.Sort(enis)
	if len(enis) != 2 {
		t.Fatalf("the pool grew to %d ENIs for 25 pods, want 2", len(enis))
	}
	p1.Stop()
	if err := st1.Close(); err != nil {
		t.Fatal(err)
	}
	// The VM is back with a new disk: its pods died with it, the store is gone.
	if err := os.Remove(e.dbPath); err != nil {
		t.Fatal(err)
	}
	created := e.emu.Snapshot().Calls["CreateNetworkInterface"]

	p2, st2 := e.startPool(bigNode, cfg)
	defer st2.Close()
	defer p2.Stop()
	var got []string
	for _, es := range p2.Status().ENIs {
		got = append(got, es.ID)
	}
	slices.Sort(got)
	if !slices.Equal(got, enis) {
		t.Fatalf("after a start on an empty store the pool holds ENIs %v, want the node's own %v", got, enis)
	}
	if n := promtest.ToFloat64(p2.m.settled.WithLabelValues("adopted_eni")); n != 2 {
		t.Errorf("tern_ipam_cloud_disagreements_total{action=\"adopted_eni\"} is %v after recovering 2 ENIs, want 2", n)
	}
	after := allocateAll(t, p2, 100, 25)
	for k, a := range after {
		if !slices.Contains(enis, a.ENI.ID) {
			t.Errorf("%s got %s on ENI %s, not on one of the node's own ENIs %v", k, a.IP, a.ENI.ID, enis)
		}
	}
	if n := e.emu.Snapshot().Calls["CreateNetworkInterface"] - created; n != 0 {
		t.Fatalf("the pool created %d ENIs after a start on an empty store: it must recover the node's own", n)
	}
}
