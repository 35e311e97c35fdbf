package bandwidth

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	pods    prometheus.GaugeFunc
	invalid prometheus.Counter
	errors  prometheus.Counter
}

func newMetrics(rec *Reconciler) *metrics {
	return &metrics{
		pods: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tern_bandwidth_limited_pods",
			Help: "Pods on this node with a bandwidth limit in the datapath (tern_bandwidth entries).",
		}, func() float64 { return float64(rec.Len()) }),
		invalid: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tern_bandwidth_invalid_annotations_total",
			Help: "Pod bandwidth annotations that could not be used (not a quantity, or outside 1k..1P); the pod got a Warning Event and runs without that limit.",
		}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tern_bandwidth_apply_errors_total",
			Help: "Failed writes of pod bandwidth limits to the datapath (the agent log says which).",
		}),
	}
}

func (m *metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.pods, m.invalid, m.errors}
}

// ModeCollector exports which mode the node's pod egress is shaped in, as
// tern_bandwidth_mode{mode="edt"|"policer"} 1.
func ModeCollector(mode Mode) prometheus.Collector {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "tern_bandwidth_mode",
		Help: "How pod egress bandwidth limits are enforced on this node: 1 for the mode in use (edt: fq paces by departure time; policer: token bucket drops), chosen at start by probing for the fq qdisc.",
	}, []string{"mode"})
	for _, m := range []Mode{ModeEDT, ModePolicer} {
		v := 0.0
		if m == mode {
			v = 1
		}
		g.WithLabelValues(string(m)).Set(v)
	}
	return g
}
