package kube

import (
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"k8s.io/client-go/rest"
)

// InstrumentAPIClient makes every request of clients built from rc countable and an outage
// of the apiserver visible. The datapath does not need the apiserver (the maps keep the last
// state it was given), so an apiserver or etcd restart breaks no traffic; what it does break
// is the flow of changes, and client-go hides that: its informers retry quietly. Operators
// therefore get tern_kubernetes_api_requests_total{result} and one log line when the
// apiserver stops answering and one when it answers again, with how long changes waited.
func InstrumentAPIClient(rc *rest.Config, reg prometheus.Registerer, log *zap.Logger) error {
	t := &apiTransport{
		log: log.Named("kube"),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tern_kubernetes_api_requests_total",
			Help: "Requests of the agent to the Kubernetes apiserver by result: ok (2xx/3xx), client_error (4xx), server_error (5xx), unreachable (no answer)."},
			[]string{"result"}),
	}
	for _, r := range []string{"ok", "client_error", "server_error", "unreachable"} {
		t.requests.WithLabelValues(r)
	}
	if err := reg.Register(t.requests); err != nil {
		return err
	}
	rc.Wrap(func(next http.RoundTripper) http.RoundTripper {
		return roundTripperFunc(func(req *http.Request) (*http.Response, error) {
			resp, err := next.RoundTrip(req)
			t.observe(req, resp, err)
			return resp, err
		})
	})
	return nil
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// apiTransport counts results and logs the transitions between answering and not.
type apiTransport struct {
	log      *zap.Logger
	requests *prometheus.CounterVec

	mu        sync.Mutex
	downSince time.Time // zero while the apiserver answers
	failures  int
}

func (t *apiTransport) observe(req *http.Request, resp *http.Response, err error) {
	if err != nil && req.Context().Err() != nil {
		return // the agent gave up on the request (shutdown, a watch it ended): not an outage
	}
	result := "ok"
	switch {
	case err != nil:
		result = "unreachable"
	case resp.StatusCode >= 500:
		result = "server_error"
	case resp.StatusCode >= 400:
		result = "client_error"
	}
	t.requests.WithLabelValues(result).Inc()
	down := result == "unreachable" || result == "server_error"
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case down && t.downSince.IsZero():
		t.downSince, t.failures = time.Now(), 1
		fields := []zap.Field{zap.String("request", req.Method+" "+req.URL.Path)}
		if err != nil {
			fields = append(fields, zap.Error(err))
		} else {
			fields = append(fields, zap.Int("status", resp.StatusCode))
		}
		t.log.Warn("the Kubernetes apiserver does not answer: traffic keeps flowing on the last Services and policies in the maps, changes wait until it is back", fields...)
	case down:
		t.failures++
	case !t.downSince.IsZero():
		t.log.Info("the Kubernetes apiserver answers again; the informers resync",
			zap.Duration("unanswered_for", time.Since(t.downSince)), zap.Int("failed_requests", t.failures))
		t.downSince, t.failures = time.Time{}, 0
	}
}
