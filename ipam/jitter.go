package ipam

import (
	"math/rand/v2"
	"time"
)

// LoopJitter is the spread of the pool's periodic work around its period: each wait is drawn
// from [period × (1 − LoopJitter), period × (1 + LoopJitter)]. A fleet of nodes restarted
// together (an upgrade, a zone recovering) would otherwise refill, reclaim and list ENIs in
// step, and the OpenAPI throttles an account, not a node.
const LoopJitter = 0.15

// Jitter returns d scaled by a factor drawn uniformly from [1 − frac, 1 + frac] (frac is
// clamped to [0, 1]), in the manner of k8s.io/apimachinery's wait.JitterUntil but symmetric,
// so the mean period stays d. A nil rnd uses the global source.
func Jitter(d time.Duration, frac float64, rnd *rand.Rand) time.Duration {
	frac = min(max(frac, 0), 1)
	if d <= 0 || frac == 0 {
		return d
	}
	u := rand.Float64()
	if rnd != nil {
		u = rnd.Float64()
	}
	return time.Duration(float64(d) * (1 + frac*(2*u-1)))
}

// JitterUp returns d lengthened by a factor drawn from [1, 1 + frac]: for waits that must not
// come early (ListingGrace must be exceeded before a listing is trusted).
func JitterUp(d time.Duration, frac float64, rnd *rand.Rand) time.Duration {
	frac = min(max(frac, 0), 1)
	if d <= 0 || frac == 0 {
		return d
	}
	u := rand.Float64()
	if rnd != nil {
		u = rnd.Float64()
	}
	return d + time.Duration(float64(d)*frac*u)
}
