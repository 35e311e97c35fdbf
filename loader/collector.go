package loader

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Collector exports the datapath's per-CPU counters (tern_metrics) to Prometheus, summed
// over CPUs at scrape time, so the hot path never pays for metrics beyond one array bump.
type Collector struct {
	maps    *Maps
	packets *prometheus.Desc
	bytes   *prometheus.Desc
	errors  *prometheus.Desc
	entries *prometheus.Desc
	capac   *prometheus.Desc
}

// NewCollector reads m at every scrape.
func NewCollector(m *Maps) *Collector {
	labels := []string{"reason", "direction"}
	return &Collector{
		maps: m,
		packets: prometheus.NewDesc("tern_datapath_packets_total",
			"Packets the datapath programs (pod veths, ENIs and the primary NIC) acted on, by reason (drops are reasons starting with drop_) and direction; for direction sock, calls of the socket-LB hooks.", labels, nil),
		bytes: prometheus.NewDesc("tern_datapath_bytes_total",
			"Bytes the datapath programs acted on, by reason and direction.", labels, nil),
		errors: prometheus.NewDesc("tern_datapath_metrics_read_failed",
			"1 when this scrape could not read the datapath counters.", nil, nil),
		entries: prometheus.NewDesc("tern_datapath_map_entries",
			"Entries in a datapath map, counted at scrape time (conntrack at capacity means LRU eviction of idle flows).", []string{"map"}, nil),
		capac: prometheus.NewDesc("tern_datapath_map_capacity",
			"The size a datapath map was created with.", []string{"map"}, nil),
	}
}

func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.packets
	ch <- c.bytes
	ch <- c.errors
	ch <- c.entries
	ch <- c.capac
}

func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	tot, err := c.maps.MetricsTotals()
	failed := 0.0
	if err != nil {
		failed = 1
	}
	pressure, err := c.maps.Pressure()
	if err != nil {
		failed = 1
	}
	for _, p := range pressure {
		ch <- prometheus.MustNewConstMetric(c.entries, prometheus.GaugeValue, float64(p.Entries), p.Name)
		ch <- prometheus.MustNewConstMetric(c.capac, prometheus.GaugeValue, float64(p.Capacity), p.Name)
	}
	ch <- prometheus.MustNewConstMetric(c.errors, prometheus.GaugeValue, failed)
	for k, v := range tot {
		ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(v.Packets), k.Reason.String(), k.Dir.String())
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(v.Bytes), k.Reason.String(), k.Dir.String())
	}
}
