package agent

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	requests   *prometheus.CounterVec
	duration   *prometheus.HistogramVec
	gcReleased prometheus.Counter
	// socketRefused counts connections closed at accept because the peer's uid may not use
	// the socket (SO_PEERCRED).
	socketRefused prometheus.Counter
	// vanishedEndpoints counts endpoint records removed at release because the pod's
	// interface had vanished without a detach (gc.go, forgetEndpointsAt).
	vanishedEndpoints prometheus.Counter
}

func newMetrics() *metrics {
	return &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tern_agent_api_requests_total",
			Help: "Requests on the agent's CNI socket by path and result (ok, or the CNI error code).",
		}, []string{"path", "result"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "tern_agent_api_request_duration_seconds",
			Help:    "Time to answer a request on the agent's CNI socket, by path.",
			Buckets: prometheus.ExponentialBuckets(0.0002, 2, 18),
		}, []string{"path"}),
		gcReleased: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tern_agent_gc_released_total",
			Help: "Allocations released by garbage collection because their sandbox was gone.",
		}),
		socketRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tern_agent_socket_refused_total",
			Help: "Connections to the agent's CNI socket closed unanswered because the peer's uid is not allowed (SO_PEERCRED).",
		}),
		vanishedEndpoints: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tern_agent_vanished_endpoints_total",
			Help: "Endpoint records removed when their address was released because the pod's interface had vanished without a detach (its network namespace destroyed with no CNI DEL).",
		}),
	}
}

func (m *metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.requests, m.duration, m.gcReleased, m.socketRefused, m.vanishedEndpoints}
}
