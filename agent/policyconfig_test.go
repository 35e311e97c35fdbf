package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Enforcement is on by default, off with networkPolicy.enforce false or Terway's
// disable_network_policy "true", and a contradiction between the two is refused.
func TestNetworkPolicyConfig(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		json    string
		enforce bool
		audit   bool
		err     string
	}{
		{`{"nodeName":"n"}`, true, false, ""},
		{`{"nodeName":"n","disable_network_policy":"true"}`, false, false, ""},
		{`{"nodeName":"n","disable_network_policy":"false"}`, true, false, ""},
		{`{"nodeName":"n","disable_network_policy":true}`, false, false, ""},
		{`{"nodeName":"n","networkPolicy":{"enforce":false}}`, false, false, ""},
		{`{"nodeName":"n","networkPolicy":{"audit":true,"auditNamespaces":["a"]}}`, true, true, ""},
		{`{"nodeName":"n","networkPolicy":{"enforce":true},"disable_network_policy":"false"}`, true, false, ""},
		{`{"nodeName":"n","networkPolicy":{"enforce":true},"disable_network_policy":"true"}`, false, false, "contradict"},
		{`{"nodeName":"n","networkPolicy":{"enforce":false},"disable_network_policy":"false"}`, false, false, "contradict"},
		{`{"nodeName":"n","disable_network_policy":"maybe"}`, false, false, `"maybe" is not a boolean`},
	} {
		path := filepath.Join(dir, "c.json")
		os.WriteFile(path, []byte(c.json), 0o600)
		cfg, err := LoadConfig(path)
		if err == nil {
			err = cfg.Validate()
		}
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%s: error %v, want %q", c.json, err, c.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.json, err)
			continue
		}
		if cfg.PolicyEnforced() != c.enforce || cfg.NetworkPolicy.Audit != c.audit {
			t.Errorf("%s: enforce %v audit %v, want %v %v", c.json, cfg.PolicyEnforced(), cfg.NetworkPolicy.Audit, c.enforce, c.audit)
		}
	}
}
