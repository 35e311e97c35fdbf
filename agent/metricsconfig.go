package agent

import (
	"errors"
	"fmt"
)

// MetricsAuthKubernetes is the metricsAuth value that guards metricsAddr with Kubernetes
// TokenReviews and SubjectAccessReviews.
const MetricsAuthKubernetes = "kubernetes"

// validateMetrics checks the options of the metrics listener; they mean nothing without one.
func (c Config) validateMetrics() []error {
	var errs []error
	cert, key := c.MetricsTLSCertFile != "", c.MetricsTLSKeyFile != ""
	switch {
	case cert && !key:
		errs = append(errs, fmt.Errorf("metricsTLSCertFile %q is set without metricsTLSKeyFile: set both to serve metricsAddr over HTTPS, or neither for HTTP", c.MetricsTLSCertFile))
	case key && !cert:
		errs = append(errs, fmt.Errorf("metricsTLSKeyFile %q is set without metricsTLSCertFile: set both to serve metricsAddr over HTTPS, or neither for HTTP", c.MetricsTLSKeyFile))
	}
	switch c.MetricsAuth {
	case "":
	case MetricsAuthKubernetes:
		if c.Kubeconfig == "" {
			errs = append(errs, errors.New(`metricsAuth "kubernetes" needs kubeconfig: the tokens are reviewed through the Kubernetes API`))
		}
	default:
		errs = append(errs, fmt.Errorf(`metricsAuth %q is not known: use "kubernetes" (bearer tokens checked by the apiserver) or leave it out`, c.MetricsAuth))
	}
	if c.MetricsAddr == "" && (cert || key || c.MetricsAuth != "") {
		errs = append(errs, errors.New("metricsTLSCertFile, metricsTLSKeyFile and metricsAuth apply to metricsAddr, which is not set: set metricsAddr (or -metrics-addr), or remove them"))
	}
	return errs
}
