package ipam

import (
	"math/rand/v2"
	"testing"
	"time"
)

func TestJitterBounds(t *testing.T) {
	const d = 10 * time.Second
	rnd := rand.New(rand.NewPCG(7, 11))
	lo, hi := time.Duration(float64(d)*(1-LoopJitter)), time.Duration(float64(d)*(1+LoopJitter))
	minSeen, maxSeen, sum := d*2, time.Duration(0), time.Duration(0)
	const n = 10000
	for range n {
		j := Jitter(d, LoopJitter, rnd)
		if j < lo || j > hi {
			t.Fatalf("Jitter(%s, %.2f) = %s, outside [%s, %s]", d, LoopJitter, j, lo, hi)
		}
		minSeen, maxSeen, sum = min(minSeen, j), max(maxSeen, j), sum+j
	}
	// The spread must really be used: nodes drift apart only if periods differ by a lot.
	if minSeen > time.Duration(float64(d)*(1-0.9*LoopJitter)) || maxSeen < time.Duration(float64(d)*(1+0.9*LoopJitter)) {
		t.Errorf("Jitter spread [%s, %s] does not reach near [%s, %s]", minSeen, maxSeen, lo, hi)
	}
	if mean := sum / n; mean < d-100*time.Millisecond || mean > d+100*time.Millisecond {
		t.Errorf("mean jittered period %s, want about %s (symmetric jitter keeps the rate)", mean, d)
	}
	if LoopJitter < 0.10 || LoopJitter > 0.20 {
		t.Errorf("LoopJitter = %.2f, want within ±10–20%%", LoopJitter)
	}

	minUp, maxUp := 2*d, time.Duration(0)
	for range n {
		j := JitterUp(d, LoopJitter, rnd)
		if j < d || j > hi {
			t.Fatalf("JitterUp(%s, %.2f) = %s, outside [%s, %s]", d, LoopJitter, j, d, hi)
		}
		minUp, maxUp = min(minUp, j), max(maxUp, j)
	}
	if minUp > d+time.Duration(float64(d)*0.1*LoopJitter) || maxUp < time.Duration(float64(d)*(1+0.9*LoopJitter)) {
		t.Errorf("JitterUp spread [%s, %s] does not cover [%s, %s]", minUp, maxUp, d, hi)
	}

	// Degenerate inputs: no jitter, no period, and a fraction above 1 clamped (never negative).
	if got := Jitter(d, 0, rnd); got != d {
		t.Errorf("Jitter(d, 0) = %s, want %s", got, d)
	}
	if got := Jitter(0, LoopJitter, rnd); got != 0 {
		t.Errorf("Jitter(0) = %s, want 0", got)
	}
	for range 1000 {
		if got := Jitter(d, 5, rnd); got < 0 || got > 2*d {
			t.Fatalf("Jitter(d, 5) = %s, want within [0, 2d] (fraction clamped to 1)", got)
		}
	}
	if got := Jitter(d, LoopJitter, nil); got < lo || got > hi {
		t.Errorf("Jitter with the global source = %s, outside [%s, %s]", got, lo, hi)
	}
}
