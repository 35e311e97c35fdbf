// Package bandwidth is tern's bandwidth manager: per-pod rate limits from the
// kubernetes.io/egress-bandwidth and kubernetes.io/ingress-bandwidth annotations (the ones
// the kubelet's bandwidth CNI plugin and Terway read), enforced by the pod programs
// (bpf/lib/bandwidth.h). Egress is paced by Earliest Departure Time where the kernel has the
// fq qdisc and policed by a token bucket where it has not; ingress is always policed.
//
// Limits parses the annotations (pure), Reconciler writes tern_bandwidth, Manager joins what
// the pods ask for with the endpoints the node serves, and ProbeFQ/EnsureFQ decide the mode
// and set up the devices for it.
package bandwidth

import (
	"errors"
	"fmt"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/tern-net/tern/loader"
)

// The annotations, as the kubelet's bandwidth plugin and Terway read them. Values are
// Kubernetes quantities in bits per second: "10M" is 10 Mbit/s.
const (
	EgressAnnotation  = "kubernetes.io/egress-bandwidth"
	IngressAnnotation = "kubernetes.io/ingress-bandwidth"
)

// The kubelet refuses limits outside 1 kbit/s..1 Pbit/s as unreasonable; so do we.
var (
	minRate = resource.MustParse("1k")
	maxRate = resource.MustParse("1P")
)

// Limits are a pod's rates in bits per second; 0 is unlimited.
type Limits struct {
	Egress, Ingress uint64
}

// IsZero says the pod has no limit in either direction.
func (l Limits) IsZero() bool { return l.Egress == 0 && l.Ingress == 0 }

// FromAnnotations reads a pod's limits. A bad value leaves its direction unlimited and is
// reported in err (every bad annotation, joined), so the caller can apply the good one and
// tell the pod's owner about the other.
func FromAnnotations(ann map[string]string) (Limits, error) {
	var (
		l    Limits
		errs []error
	)
	for _, d := range []struct {
		key string
		dst *uint64
	}{{EgressAnnotation, &l.Egress}, {IngressAnnotation, &l.Ingress}} {
		s, ok := ann[d.key]
		if !ok {
			continue
		}
		v, err := parseRate(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("annotation %s=%q: %w", d.key, s, err))
			continue
		}
		*d.dst = v
	}
	return l, errors.Join(errs...)
}

func parseRate(s string) (uint64, error) {
	q, err := resource.ParseQuantity(s)
	if err != nil {
		return 0, fmt.Errorf("not a Kubernetes quantity (write bits per second, e.g. 10M for 10 Mbit/s): %w", err)
	}
	if q.Cmp(minRate) < 0 {
		return 0, fmt.Errorf("%s bit/s is below the smallest limit, 1k (1 kbit/s)", q.String())
	}
	if q.Cmp(maxRate) > 0 {
		return 0, fmt.Errorf("%s bit/s is above the largest limit, 1P (1 Pbit/s)", q.String())
	}
	return uint64(q.Value()), nil
}

// The policer's bucket holds BurstTime of traffic at the pod's rate, and never less than
// MinBurst. A policer drops where a shaper would queue; a TCP sender that loses the tail of
// its window waits for a retransmission timeout (200 ms at least on Linux) before it sends
// again. A bucket that holds more than that timeout's worth lets the sender make up for the
// pause, so the long-run rate is the limit (measured: 20 ms of bucket gave 75% of 10 Mbit/s
// and 10% of 100 Mbit/s; 250 ms gives 97-99% of both, test/e2e TestBandwidthLimitsPods).
// Kubernetes' own CNI bandwidth path sets an even larger burst (2^31 bits). MinBurst keeps
// very low rates above three 64 KiB GSO segments, the unit a TCP sender hands the veth.
const (
	BurstTime = 250 * time.Millisecond
	MinBurst  = 3 * 64 << 10
)

// EDT's horizon: a packet whose departure lies further ahead is dropped. At least
// MinHorizon (2 s, as Cilium), and at least the time TSQHeadroom bytes take at the pod's rate:
// TCP's small-queue check lets one socket keep up to net.ipv4.tcp_limit_output_bytes (4 MiB
// since Linux 6.7) waiting in fq, which at 5 Mbit/s is 6.7 s. A horizon shorter than that
// drops what TCP would never have sent ahead of its own backpressure (seen on 6.12: 13 drops
// and 23% below the limit). At most MaxHorizon, within the fq horizon EnsureFQ sets.
const (
	MinHorizon  = 2 * time.Second
	MaxHorizon  = 60 * time.Second
	TSQHeadroom = 4 << 20
)

// direction is the map encoding of one direction's limit: the policer's bucket, or, for
// egress in EDT mode (paced), the horizon.
func direction(bitsPerSecond uint64, paced bool) loader.BWDir {
	if bitsPerSecond == 0 {
		return loader.BWDir{}
	}
	rate := bitsPerSecond / 8
	if rate == 0 {
		rate = 1
	}
	if paced {
		h := uint64(TSQHeadroom) * uint64(time.Second) / rate
		h = max(h, uint64(MinHorizon))
		h = min(h, uint64(MaxHorizon))
		return loader.BWDir{Rate: rate, BurstNs: h}
	}
	burst := rate * uint64(BurstTime) / uint64(time.Second)
	if burst < MinBurst {
		burst = MinBurst
	}
	// burst / rate in ns; a 1 kbit/s pod's 192 KiB bucket is ~1573 s, far from overflow.
	return loader.BWDir{Rate: rate, BurstNs: burst * uint64(time.Second) / rate}
}

// value is what tern_bandwidth holds for l in mode (the programs' state fields zero).
// Ingress is always policed.
func (l Limits) value(mode Mode) loader.BWValue {
	return loader.BWValue{Egress: direction(l.Egress, mode == ModeEDT), Ingress: direction(l.Ingress, false)}
}
