package ipam

import (
	"context"
	"errors"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tern-net/tern/ipam/aliyun"
)

type metrics struct {
	ips           *prometheus.GaugeVec
	enis          prometheus.Gauge
	allocDuration prometheus.Histogram
	errors        *prometheus.CounterVec
	// settled counts what the pool did about a disagreement with the cloud's listing
	// (reconcile.go, settle): the only trace an operator has of a node that lost its store.
	settled *prometheus.CounterVec
}

func newMetrics() *metrics {
	return &metrics{
		ips: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tern_ipam_pool_ips",
			Help: "Secondary IPs held by the node's ENIs, by state (idle, in_use).",
		}, []string{"state"}),
		enis: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tern_ipam_enis",
			Help: "ENIs the pool owns on this node.",
		}),
		allocDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "tern_ipam_allocation_duration_seconds",
			Help:    "Time for Allocate to return, success or not.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tern_ipam_errors_total",
			Help: "Pool errors by cause (vswitch_exhausted, node_full, try_again, credentials, permission, quota, other).",
		}, []string{"cause"}),
		settled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tern_ipam_cloud_disagreements_total",
			Help: "Disagreements between the pool and the cloud's ENI listing the pool acted on, by action (adopted_eni, adopted_ip, dropped_ip, forgot_eni, deleted_eni, recovered_allocation).",
		}, []string{"action"}),
	}
}

// Collectors returns the pool's metrics for the caller to register.
func (p *Pool) Collectors() []prometheus.Collector {
	return []prometheus.Collector{p.m.ips, p.m.enis, p.m.allocDuration, p.m.errors, p.m.settled}
}

func causeOf(err error) string {
	switch {
	case errors.Is(err, ErrVSwitchExhausted):
		return "vswitch_exhausted"
	case errors.Is(err, ErrNodeFull):
		return "node_full"
	case errors.Is(err, ErrPoolEmptyTryAgain):
		return "try_again"
	case errors.Is(err, aliyun.ErrCredentials):
		return "credentials"
	case errors.Is(err, aliyun.ErrForbidden):
		return "permission"
	case errors.Is(err, aliyun.ErrQuota):
		return "quota"
	case errors.Is(err, aliyun.ErrBadVSwitch):
		return "bad_vswitch"
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return "canceled"
	default:
		return "other"
	}
}
