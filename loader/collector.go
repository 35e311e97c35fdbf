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
	// Masquerade port allocation (tern_snat_stats): tries/allocations is how crowded the
	// port space towards busy destinations is.
	snatAllocs *prometheus.Desc
	snatTries  *prometheus.Desc
	snatFails  *prometheus.Desc
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
		snatAllocs: prometheus.NewDesc("tern_datapath_snat_allocations_total",
			"Masquerade translations claimed for new flows (or taken back by a flow whose conntrack entry was evicted).", nil, nil),
		snatTries: prometheus.NewDesc("tern_datapath_snat_port_tries_total",
			"Candidate ports masquerade port allocation looked at; divided by allocations, how crowded the port space is.", nil, nil),
		snatFails: prometheus.NewDesc("tern_datapath_snat_allocation_failures_total",
			"New masqueraded flows dropped because no port was free within the bounded tries (drop_snat_no_port).", nil, nil),
	}
}

func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.packets
	ch <- c.bytes
	ch <- c.errors
	ch <- c.entries
	ch <- c.capac
	ch <- c.snatAllocs
	ch <- c.snatTries
	ch <- c.snatFails
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
	if c.maps.SNATStats != nil {
		if st, err := c.maps.SNATStatsTotals(); err != nil {
			failed = 1
		} else {
			ch <- prometheus.MustNewConstMetric(c.snatAllocs, prometheus.CounterValue, float64(st.Allocations))
			ch <- prometheus.MustNewConstMetric(c.snatTries, prometheus.CounterValue, float64(st.Tries))
			ch <- prometheus.MustNewConstMetric(c.snatFails, prometheus.CounterValue, float64(st.Failures))
		}
	}
	ch <- prometheus.MustNewConstMetric(c.errors, prometheus.GaugeValue, failed)
	for k, v := range tot {
		ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(v.Packets), k.Reason.String(), k.Dir.String())
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(v.Bytes), k.Reason.String(), k.Dir.String())
	}
}
