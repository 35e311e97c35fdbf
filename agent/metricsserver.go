package agent

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tern-net/tern/agent/metricsauth"
)

func (a *Agent) serveMetrics() (*http.Server, error) {
	ln, err := net.Listen("tcp", a.cfg.MetricsAddr)
	if err != nil {
		return nil, fmt.Errorf("listen for metrics on %s: %w", a.cfg.MetricsAddr, err)
	}
	return a.ServeMetrics(ln)
}

// ServeMetrics serves /metrics, /healthz and /readyz on ln, over HTTPS when the config names a
// certificate and behind Kubernetes authorization when metricsAuth says so, until the returned
// server is closed. Run calls it on metricsAddr; tests hand in their own listener. On error ln
// is closed.
func (a *Agent) ServeMetrics(ln net.Listener) (*http.Server, error) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(a.reg, promhttp.HandlerOpts{}))
	// /healthz: the process serves (liveness). /readyz: every readiness component is ready
	// (the datapath loaded, the pool started, each datapath component's first full sync in
	// the maps), so pods can be networked here; otherwise 503 naming what is not ready.
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.Handle("/readyz", a.readiness)
	var handler http.Handler = mux
	if a.cfg.MetricsAuth == MetricsAuthKubernetes {
		client, err := a.metricsAuthClient()
		if err != nil {
			_ = ln.Close()
			return nil, err
		}
		// The probes stay open: the kubelet cannot present a ServiceAccount token, and they
		// tell no more than whether the agent runs and which component it waits for.
		handler = metricsauth.New(client, metricsauth.Options{Open: []string{"/healthz", "/readyz"},
			Logger: a.log.Named("metricsauth")}).Wrap(mux)
	}
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	// net/http logs failed handshakes (port scanners, clients without the CA) and the like:
	// the client's problem, so at debug level, not on stderr.
	if l, err := zap.NewStdLogAt(a.log.Named("metrics"), zapcore.DebugLevel); err == nil {
		srv.ErrorLog = l
	}
	tlsOn := a.cfg.MetricsTLSCertFile != ""
	if tlsOn {
		certs, err := newCertReloader(a.cfg.MetricsTLSCertFile, a.cfg.MetricsTLSKeyFile, a.log)
		if err != nil {
			_ = ln.Close()
			return nil, err
		}
		srv.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: certs.GetCertificate}
	}
	if a.cfg.MetricsAuth != "" && !tlsOn {
		a.log.Warn("metricsAuth is on but metricsAddr serves plain HTTP: bearer tokens cross the network readable; set metricsTLSCertFile and metricsTLSKeyFile",
			zap.String("addr", ln.Addr().String()))
	}
	go func() {
		var err error
		if tlsOn {
			err = srv.ServeTLS(ln, "", "")
		} else {
			err = srv.Serve(ln)
		}
		if err != nil && err != http.ErrServerClosed {
			a.log.Error("metrics listener stopped", zap.String("addr", ln.Addr().String()), zap.Error(err))
		}
	}()
	return srv, nil
}

// metricsAuthClient is a client of its own for the reviews, from the agent's kubeconfig;
// client-go re-reads a kubeconfig's token file, so a rotated ServiceAccount token is used.
func (a *Agent) metricsAuthClient() (kubernetes.Interface, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", a.cfg.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("metricsAuth %q: read kubeconfig %s: %w", a.cfg.MetricsAuth, a.cfg.Kubeconfig, err)
	}
	rc.UserAgent = "tern-agent/" + a.cfg.NodeName + "/metricsauth"
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("metricsAuth %q: Kubernetes client from %s: %w", a.cfg.MetricsAuth, a.cfg.Kubeconfig, err)
	}
	return client, nil
}

// certReloader hands out the metrics certificate and loads the files again when either
// changes (cert-manager or a Secret volume rotating them), keeping the last good pair when a
// half-written one does not load.
type certReloader struct {
	certFile, keyFile string
	log               *zap.Logger

	mu    sync.Mutex
	cert  *tls.Certificate
	stamp string // size and modification time of both files when cert was loaded
}

func newCertReloader(certFile, keyFile string, log *zap.Logger) (*certReloader, error) {
	r := &certReloader{certFile: certFile, keyFile: keyFile, log: log}
	stamp, err := r.fileStamp()
	if err != nil {
		return nil, fmt.Errorf("metrics TLS: %w (metricsTLSCertFile and metricsTLSKeyFile must name readable PEM files)", err)
	}
	if err := r.load(stamp); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *certReloader) fileStamp() (string, error) {
	var s string
	for _, p := range []string{r.certFile, r.keyFile} {
		st, err := os.Stat(p)
		if err != nil {
			return "", err
		}
		s += fmt.Sprintf("%d/%d;", st.Size(), st.ModTime().UnixNano())
	}
	return s, nil
}

func (r *certReloader) load(stamp string) error {
	c, err := tls.LoadX509KeyPair(r.certFile, r.keyFile)
	if err != nil {
		return fmt.Errorf("metrics TLS: load certificate %s and key %s: %w (both must be PEM and match)", r.certFile, r.keyFile, err)
	}
	r.cert, r.stamp = &c, stamp
	return nil
}

// GetCertificate is tls.Config's hook: two stats per handshake, a reload only on change.
func (r *certReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	stamp, err := r.fileStamp()
	if err == nil && stamp != r.stamp {
		if err := r.load(stamp); err != nil {
			r.stamp = stamp // warn once per change, not per handshake
			r.log.Warn("metrics TLS: keeping the previous certificate", zap.Error(err))
		} else {
			r.log.Info("metrics TLS: certificate reloaded", zap.String("cert", r.certFile))
		}
	}
	return r.cert, nil
}
