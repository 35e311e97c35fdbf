//go:build linux

package deploy_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/test/deploy"
	"github.com/tern-net/tern/test/deploy/agentrun"
	"github.com/tern-net/tern/test/k8s/controlplane"
)

// TestMetricsTLSAndKubernetesAuth serves the agent's metrics listener the way the DaemonSet
// would with metricsTLSCertFile/metricsTLSKeyFile and metricsAuth "kubernetes": the agent's
// kubeconfig is the ConfigMap's, carrying a token of the tern-agent ServiceAccount with the
// manifests' RBAC only, so its TokenReviews and SubjectAccessReviews go to a real apiserver
// under that identity. Against it:
//   - no token, or a token the apiserver does not know: 401; a ServiceAccount without RBAC for
//     /metrics: 403; one bound to a ClusterRole allowing get on the non-resource URL /metrics:
//     200 with the agent's metrics (a missing tokenreviews or subjectaccessreviews rule in the
//     manifest turns this into 503);
//   - /healthz and /readyz answer without a token (the kubelet's probes);
//   - the listener speaks TLS only, with the certificate generated here, and serves a
//     replaced certificate from the next handshake on, without a restart.
func TestMetricsTLSAndKubernetesAuth(t *testing.T) {
	objs := load(t)
	cm := find[*corev1.ConfigMap](t, objs, "ConfigMap", "eni-config")
	if _, err := controlplane.BinDir(); err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cp.Stop(); err != nil {
			t.Errorf("stop control plane: %v", err)
		}
	})
	ap, err := deploy.NewApplier(cp.RestConfig())
	if err != nil {
		t.Fatal(err)
	}
	applyRBAC(ctx, t, ap, objs)
	admin := kubernetes.NewForConfigOrDie(cp.RestConfig())

	// The scrapers: one bound to a metrics-reader role, one with no grant at all.
	const ns = "monitoring"
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"prometheus", "stranger"} {
		if _, err := admin.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := admin.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "tern-metrics-reader"},
		Rules: []rbacv1.PolicyRule{{NonResourceURLs: []string{"/metrics"}, Verbs: []string{"get"}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "tern-metrics-reader"},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "tern-metrics-reader"},
		Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: "prometheus", Namespace: ns}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	token := func(ns, name string) string {
		t.Helper()
		expiry := int64(3600)
		tr, err := admin.CoreV1().ServiceAccounts(ns).CreateToken(ctx, name,
			&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &expiry}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("mint a token for %s/%s: %v", ns, name, err)
		}
		return tr.Status.Token
	}
	agentKubeconfig, err := agentrun.WriteKubeconfig(t.TempDir(), cm.Data["kubeconfig"], cp.APIServerURL(), cp.RestConfig().CAData,
		token("kube-system", "tern-agent"))
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	firstCert := writeSelfSigned(t, certFile, keyFile, "tern-agent metrics 1")
	a, err := agent.New(agent.Config{NodeName: "node-a", InstanceID: "i-metrics", StatePath: filepath.Join(dir, "ipam.db"),
		SocketPath: filepath.Join(dir, "agent.sock"), MetricsAddr: "127.0.0.1:0", Kubeconfig: agentKubeconfig,
		MetricsTLSCertFile: certFile, MetricsTLSKeyFile: keyFile, MetricsAuth: agent.MetricsAuthKubernetes},
		zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := a.ServeMetrics(ln)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	base := "https://" + ln.Addr().String()

	// get does one request on a fresh connection (so each sees the current certificate),
	// trusting only roots.
	get := func(path, bearer string, roots *x509.CertPool) (int, string, *x509.Certificate, error) {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, DisableKeepAlives: true}
		defer tr.CloseIdleConnections()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
		if err != nil {
			return 0, "", nil, err
		}
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := tr.RoundTrip(req)
		if err != nil {
			return 0, "", nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), resp.TLS.PeerCertificates[0], err
	}
	roots := x509.NewCertPool()
	roots.AddCert(firstCert)

	prometheus, stranger := token(ns, "prometheus"), token(ns, "stranger")
	cases := []struct {
		name, path, token string
		code              int
		body              string
	}{
		{"no token", "/metrics", "", http.StatusUnauthorized, "Unauthorized"},
		{"a token the apiserver never issued", "/metrics", "not-a-token", http.StatusUnauthorized, "not valid"},
		{"a ServiceAccount without the metrics role", "/metrics", stranger, http.StatusForbidden, "system:serviceaccount:monitoring:stranger"},
		{"the metrics reader", "/metrics", prometheus, http.StatusOK, "go_goroutines"},
		{"the metrics reader, again (cached review)", "/metrics", prometheus, http.StatusOK, "go_goroutines"},
		{"the stranger, again (cached review)", "/metrics", stranger, http.StatusForbidden, "may not get /metrics"},
		{"liveness probe without a token", "/healthz", "", http.StatusOK, "ok"},
		// Not ready (the agent was never run), but answered, not refused.
		{"readiness probe without a token", "/readyz", "", http.StatusServiceUnavailable, "agent"},
	}
	for _, c := range cases {
		code, body, _, err := get(c.path, c.token, roots)
		if err != nil {
			t.Fatalf("%s: GET %s: %v", c.name, c.path, err)
		}
		if code != c.code || !strings.Contains(body, c.body) {
			t.Errorf("%s: GET %s answered %d %q; want %d with %q", c.name, c.path, code, truncate(body), c.code, c.body)
		}
	}

	// TLS only: a client that does not trust the certificate fails the handshake, and plain
	// HTTP gets no metrics.
	if _, _, _, err := get("/metrics", prometheus, x509.NewCertPool()); err == nil || !errors.As(err, new(*tls.CertificateVerificationError)) {
		t.Errorf("a client not trusting the generated certificate: %v; want a certificate verification error", err)
	}
	resp, err := http.Get("http://" + ln.Addr().String() + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	plain, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || strings.Contains(string(plain), "ok") {
		t.Errorf("plain HTTP to the TLS listener answered %d %q; want 400", resp.StatusCode, plain)
	}

	// A rotated certificate is served from the next handshake on.
	secondCert := writeSelfSigned(t, certFile, keyFile, "tern-agent metrics 2")
	roots.AddCert(secondCert)
	code, _, peer, err := get("/metrics", prometheus, roots)
	if err != nil || code != http.StatusOK {
		t.Fatalf("after rotating the certificate: %d %v", code, err)
	}
	if !peer.Equal(secondCert) {
		t.Errorf("after rotation the listener presents %q; want the new certificate %q", peer.Subject.CommonName, secondCert.Subject.CommonName)
	}
}

// TestMetricsTLSRefusesBadFiles: a certificate that does not load stops ServeMetrics with an
// error naming both files, and the listener is closed.
func TestMetricsTLSRefusesBadFiles(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	writeSelfSigned(t, certFile, keyFile, "x")
	otherKey := filepath.Join(dir, "other.key")
	writeSelfSigned(t, filepath.Join(dir, "other.crt"), otherKey, "y")
	for name, files := range map[string][2]string{
		"missing key":    {certFile, filepath.Join(dir, "nope.key")},
		"mismatched key": {certFile, otherKey},
	} {
		a, err := agent.New(agent.Config{NodeName: "node-a", InstanceID: "i-1", StatePath: filepath.Join(dir, "ipam.db"),
			SocketPath: filepath.Join(dir, "agent.sock"), MetricsAddr: "127.0.0.1:0",
			MetricsTLSCertFile: files[0], MetricsTLSKeyFile: files[1]}, nil)
		if err != nil {
			t.Fatal(err)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv, err := a.ServeMetrics(ln)
		if err == nil {
			_ = srv.Close()
			t.Errorf("%s: served", name)
			continue
		}
		if !strings.Contains(err.Error(), files[1]) {
			t.Errorf("%s: error %q does not name %s", name, err, files[1])
		}
		if _, err := net.Dial("tcp", ln.Addr().String()); err == nil {
			t.Errorf("%s: the listener is still open after the error", name)
		}
	}
}

func truncate(s string) string {
	if len(s) > 300 {
		return s[:300] + "…"
	}
	return s
}

// writeSelfSigned writes a fresh self-signed certificate for 127.0.0.1 and its key, each
// file replaced in one rename, and returns the certificate.
func writeSelfSigned(t *testing.T, certFile, keyFile, cn string) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	for path, block := range map[string]*pem.Block{certFile: {Type: "CERTIFICATE", Bytes: der}, keyFile: {Type: "PRIVATE KEY", Bytes: keyDER}} {
		var b bytes.Buffer
		if err := pem.Encode(&b, block); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path+".tmp", b.Bytes(), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(path+".tmp", path); err != nil {
			t.Fatal(fmt.Errorf("replace %s: %w", path, err))
		}
	}
	return cert
}
