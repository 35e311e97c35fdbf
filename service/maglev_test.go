package service

import (
	"net/netip"
	"testing"
)

func maglevBackends(n int) []Backend {
	out := make([]Backend, n)
	for i := range out {
		out[i] = Backend{Addr: netip.AddrFrom4([4]byte{10, 1, byte(i / 250), byte(i%250 + 1)}), Port: 8080}
	}
	return out
}

func TestMaglevSize(t *testing.T) {
	for _, c := range []struct {
		n     int
		fixed uint32
		want  uint32
	}{{1, 0, 251}, {3, 0, 509}, {5, 0, 509}, {6, 0, 1021}, {100, 0, 16381}, {5000, 0, 131071}, {5, 65521, 65521}} {
		if got := MaglevSize(c.n, c.fixed); got != c.want {
			t.Errorf("MaglevSize(%d, %d) = %d, want %d", c.n, c.fixed, got, c.want)
		}
	}
	if err := ValidMaglevSize(1000); err == nil {
		t.Error("1000 accepted as a Maglev table size")
	}
	if err := ValidMaglevSize(16381); err != nil {
		t.Error(err)
	}
}

// Every backend holds its fair share of the table: the paper's construction gives each
// between floor and ceil of m/n entries, give or take the last round; assert within 1% of m/n
// (and at least one entry) for several sizes.
func TestMaglevShares(t *testing.T) {
	for _, n := range []int{1, 2, 3, 5, 10, 33, 100} {
		bs := maglevBackends(n)
		m := MaglevSize(n, 0)
		table := Maglev(bs, m)
		if len(table) != int(m) {
			t.Fatalf("n=%d: table has %d entries, want %d", n, len(table), m)
		}
		count := make([]int, n)
		for _, e := range table {
			count[e]++
		}
		fair := float64(m) / float64(n)
		for i, c := range count {
			if d := float64(c) - fair; d > fair*0.01+1 || d < -fair*0.01-1 {
				t.Errorf("n=%d m=%d: backend %d holds %d entries, fair share %.1f", n, m, i, c, fair)
			}
		}
	}
}

// Removing one of N backends moves the entries it held (1/N of the table) and few others.
// Measured at the default sizes (N = 5, 10, 20, 50, 100): 21.4-22.8%, 12.3-13.0%,
// 7.2-7.6%, 3.5-3.8%, 2.2-2.3% of the table moved; the entries that changed owner between
// surviving backends were 1.2-3.0% of the table. The test asserts at most 4% beyond the
// removed backend's own. Choosing at random (what a non-Maglev frontend does for a new
// flow) would send (N-1)/N of the flows elsewhere.
func TestMaglevRemovalMovesAboutOneNth(t *testing.T) {
	for _, n := range []int{5, 10, 20, 50, 100} {
		bs := maglevBackends(n)
		m := MaglevSize(n, 0)
		before := Maglev(bs, m)
		for _, gone := range []int{0, n / 2, n - 1} {
			rest := append(append([]Backend(nil), bs[:gone]...), bs[gone+1:]...)
			after := Maglev(rest, m)
			moved, extra, own := 0, 0, 0
			for i := range before {
				was := bs[before[i]]
				now := rest[after[i]]
				if was != now {
					moved++
					if before[i] != uint32(gone) {
						extra++
					}
				}
				if before[i] == uint32(gone) {
					own++
				}
			}
			frac := float64(moved) / float64(m)
			bound := float64(own)/float64(m) + 0.04
			t.Logf("n=%d m=%d remove #%d: %.2f%% of entries moved (1/N = %.2f%%), %d beyond the removed backend's", n, m, gone, 100*frac, 100/float64(n), extra)
			if frac > bound {
				t.Errorf("n=%d: removing backend %d moved %.2f%% of the table, want at most its own share + 4%% = %.2f%%", n, gone, 100*frac, 100*bound)
			}
		}
	}
}

func TestMaglevIsDeterministicAndOrderFree(t *testing.T) {
	bs := maglevBackends(7)
	a := Maglev(bs, 1021)
	rev := make([]Backend, len(bs))
	for i, b := range bs {
		rev[len(bs)-1-i] = b
	}
	b := Maglev(rev, 1021)
	for i := range a {
		if bs[a[i]] != rev[b[i]] {
			t.Fatalf("entry %d: %v with one order, %v with the reverse", i, bs[a[i]], rev[b[i]])
		}
	}
	if Maglev(nil, 251) != nil {
		t.Error("a table for no backends")
	}
}
