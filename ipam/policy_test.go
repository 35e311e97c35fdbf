package ipam

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/eniconfig"
)

func TestCapacityOf(t *testing.T) {
	// EniQuantity/EniPrivateIpAddressQuantity as the emulator's g7 table carries them.
	tests := []struct {
		typ       string
		enis, ips int
		want      int
	}{
		// The published planning table: (EniQuantity − 1) × EniPrivateIpAddressQuantity.
		{"ecs.g7.large", 3, 6, 12},
		{"ecs.g7.xlarge", 4, 10, 30},
		{"ecs.g7.2xlarge", 4, 15, 45},
		{"ecs.g7.4xlarge", 8, 20, 140},
		{"no secondary ENI", 1, 10, 0},
	}
	for _, tc := range tests {
		c := CapacityOf(aliyun.Limits{InstanceType: tc.typ, ENIs: tc.enis, IPsPerENI: tc.ips})
		if c.MaxPods != tc.want || c.ENIs != tc.enis-1 || c.IPsPerENI != tc.ips {
			t.Errorf("%s: capacity %+v, want %d pods", tc.typ, c, tc.want)
		}
	}
}

func TestOrderVSwitches(t *testing.T) {
	cands := []aliyun.VSwitch{
		{ID: "vsw-a", Available: 10},
		{ID: "vsw-b", Available: 0},
		{ID: "vsw-c", Available: 50},
		{ID: "vsw-d", Available: 50},
		{ID: "vsw-e", Available: 1},
		{ID: "vsw-f", Available: 99},
	}
	got := orderVSwitches(cands, eniconfig.VSwitchOrdered, map[string]bool{"vsw-f": true}, nil)
	// Most free first, config order on ties; empty and exhausted ones skipped (one free
	// address is enough: the new ENI's primary serves a pod).
	if want := []string{"vsw-c", "vsw-d", "vsw-a", "vsw-e"}; !slices.Equal(got, want) {
		t.Errorf("ordered = %v, want %v", got, want)
	}
	rnd := rand.New(rand.NewPCG(1, 2))
	seen := map[string]bool{}
	for range 50 {
		got := orderVSwitches(cands, eniconfig.VSwitchRandom, nil, rnd)
		if len(got) != 5 || slices.Contains(got, "vsw-b") {
			t.Fatalf("random = %v: must hold exactly a, c, d, e, f", got)
		}
		seen[got[0]] = true
	}
	if len(seen) < 2 {
		t.Errorf("random policy always starts with the same vSwitch: %v", seen)
	}
}

func TestBatchSize(t *testing.T) {
	tests := []struct {
		name                                  string
		waiting, idle, minPool, maxPool, room int
		want                                  int
	}{
		{"burst of 30 is capped at one call", 30, 0, 0, 5, 29, 10},
		{"3 waiting asks for them plus max idle", 3, 0, 0, 5, 29, 8},
		{"waiters already covered by idle", 3, 4, 0, 5, 29, 0},
		{"no waiters tops up to min", 0, 1, 4, 10, 29, 3},
		{"at min nothing to do", 0, 4, 4, 10, 29, 0},
		{"room limits the batch", 30, 0, 0, 5, 2, 2},
		{"full ENI gives nothing", 5, 0, 0, 5, 0, 0},
	}
	for _, tc := range tests {
		if got := batchSize(tc.waiting, tc.idle, tc.minPool, tc.maxPool, tc.room); got != tc.want {
			t.Errorf("%s: batchSize = %d, want %d", tc.name, got, tc.want)
		}
	}
}

func TestReclaimCount(t *testing.T) {
	tests := []struct{ idle, expired, minPool, maxPool, want int }{
		{12, 0, 2, 5, 7}, // above max: back to max
		{4, 0, 2, 5, 0},  // within bounds, nothing expired
		{4, 4, 2, 5, 2},  // expired, down to min
		{4, 1, 2, 5, 1},  // only the expired one
		{9, 9, 2, 5, 7},  // both rules: expired down to min wins
		{1, 1, 2, 5, 0},  // below min: keep
	}
	for _, tc := range tests {
		if got := reclaimCount(tc.idle, tc.expired, tc.minPool, tc.maxPool); got != tc.want {
			t.Errorf("reclaimCount(%d,%d,%d,%d) = %d, want %d", tc.idle, tc.expired, tc.minPool, tc.maxPool, got, tc.want)
		}
	}
}

func TestGatewayIsThirdFromLast(t *testing.T) {
	if g := aliyun.Gateway(netip.MustParsePrefix("192.168.1.0/24")); g != netip.MustParseAddr("192.168.1.253") {
		t.Errorf("gateway of /24 = %v", g)
	}
	if g := aliyun.Gateway(netip.MustParsePrefix("10.0.0.0/29")); g != netip.MustParseAddr("10.0.0.5") {
		t.Errorf("gateway of /29 = %v", g)
	}
}
