package policymap

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/policy"
)

// Collector exports tern_policy_stats per policy, read at scrape time: names from
// tern_policy_names (so the series survive an agent restart with their slots), per-CPU
// counters summed. Slot 0 ("unknown": more policies than slots) is exported only when it
// counted something.
type Collector struct {
	maps    *loader.PolicyMaps
	packets *prometheus.Desc
	bytes   *prometheus.Desc
	failed  *prometheus.Desc
}

// NewCollector reads m at every scrape.
func NewCollector(m *loader.PolicyMaps) *Collector {
	labels := []string{"policy", "direction", "verdict"}
	return &Collector{
		maps: m,
		packets: prometheus.NewDesc("tern_policy_verdict_packets_total",
			"Packets NetworkPolicy judged on this node, by the policy that decided (namespace/name), the direction of the pod's policy (ingress, egress) and the verdict (allowed: the first packet of each new flow; denied: every dropped packet, or every would-drop in audit mode).", labels, nil),
		bytes: prometheus.NewDesc("tern_policy_verdict_bytes_total",
			"Bytes of the packets counted by tern_policy_verdict_packets_total.", labels, nil),
		failed: prometheus.NewDesc("tern_policy_stats_read_failed",
			"1 when this scrape could not read the per-policy counters.", nil, nil),
	}
}

func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.packets
	ch <- c.bytes
	ch <- c.failed
}

func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	failed := 0.0
	defer func() { ch <- prometheus.MustNewConstMetric(c.failed, prometheus.GaugeValue, failed) }()
	names := map[uint32]string{0: "unknown"}
	var (
		k uint32
		v loader.PolicyName
	)
	it := c.maps.Names.Iterate()
	for it.Next(&k, &v) {
		names[k] = v.String()
	}
	if it.Err() != nil {
		failed = 1
		return
	}
	for slot, name := range names {
		for _, dir := range []policy.Direction{policy.Ingress, policy.Egress} {
			st, err := loader.ReadPolicyStats(c.maps.Stats, slot, uint8(dir))
			if err != nil {
				failed = 1
				return
			}
			if slot == 0 && st == (loader.PolicyCounters{}) {
				continue
			}
			d := dir.String()
			ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(st.AllowedPackets), name, d, "allowed")
			ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(st.AllowedBytes), name, d, "allowed")
			ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(st.DeniedPackets), name, d, "denied")
			ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(st.DeniedBytes), name, d, "denied")
		}
	}
}
