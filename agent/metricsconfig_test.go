package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestMetricsOptionsValidated: the TLS pair goes together, metricsAuth needs a kubeconfig and
// a known value, and none of them means anything without metricsAddr. Each error names the
// field and what to do.
func TestMetricsOptionsValidated(t *testing.T) {
	base := Config{NodeName: "n1", MetricsAddr: ":9464", Kubeconfig: "/etc/tern/kubeconfig"}
	cases := []struct {
		name string
		edit func(*Config)
		want []string // substrings of the error; none: valid
	}{
		{"plain", func(*Config) {}, nil},
		{"TLS and auth", func(c *Config) {
			c.MetricsTLSCertFile, c.MetricsTLSKeyFile, c.MetricsAuth = "/tls/tls.crt", "/tls/tls.key", MetricsAuthKubernetes
		}, nil},
		{"certificate only", func(c *Config) { c.MetricsTLSCertFile = "/tls/tls.crt" },
			[]string{`metricsTLSCertFile "/tls/tls.crt" is set without metricsTLSKeyFile`, "set both"}},
		{"key only", func(c *Config) { c.MetricsTLSKeyFile = "/tls/tls.key" },
			[]string{`metricsTLSKeyFile "/tls/tls.key" is set without metricsTLSCertFile`, "set both"}},
		{"auth without kubeconfig", func(c *Config) { c.MetricsAuth, c.Kubeconfig = MetricsAuthKubernetes, "" },
			[]string{`metricsAuth "kubernetes" needs kubeconfig`}},
		{"unknown auth", func(c *Config) { c.MetricsAuth = "basic" },
			[]string{`metricsAuth "basic" is not known`, `use "kubernetes"`}},
		{"options without a listener", func(c *Config) {
			c.MetricsAddr, c.MetricsTLSCertFile, c.MetricsTLSKeyFile = "", "/tls/tls.crt", "/tls/tls.key"
		}, []string{"metricsAddr, which is not set"}},
	}
	for _, tc := range cases {
		c := base
		tc.edit(&c)
		c.setDefaults()
		err := c.Validate()
		if len(tc.want) == 0 {
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("%s: accepted", tc.name)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not say %q", tc.name, err, w)
			}
		}
	}
}

// TestMetricsOptionsJSONNames: the field names docs/cni.md and deploy/README.md give load.
func TestMetricsOptionsJSONNames(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.json")
	doc := `{"nodeName":"n1","metricsAddr":":9464","kubeconfig":"/etc/tern/kubeconfig",
		"metricsTLSCertFile":"/etc/tern/metrics-tls/tls.crt","metricsTLSKeyFile":"/etc/tern/metrics-tls/tls.key",
		"metricsAuth":"kubernetes"}`
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.MetricsTLSCertFile != "/etc/tern/metrics-tls/tls.crt" || c.MetricsTLSKeyFile != "/etc/tern/metrics-tls/tls.key" ||
		c.MetricsAuth != MetricsAuthKubernetes {
		t.Fatalf("loaded %+v", c)
	}
}
