package agent

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
)

// Contradictory settings are refused at New, each with an error that names both sides and
// says what to change; consistent ones pass. Every case starts from a valid config.
func TestConfigRefusesContradictions(t *testing.T) {
	yes := true
	base := func() Config { return Config{NodeName: "n1", InstanceID: "i-1"} }
	none := func() Config { c := base(); c.InstanceID = ""; c.IPAM.Mode = IPAMNone; return c }
	for _, tc := range []struct {
		name string
		cfg  func() Config
		want []string // substrings of the error; nil: accepted
	}{
		{"eniip default", base, nil},
		{"kube-proxy-replacement false, socket LB on", func() Config {
			c := base()
			c.KubeProxyReplacement, c.SocketLB.Enabled = KPRFalse, true
			return c
		}, []string{`kube-proxy-replacement is "false" but socketLB.enabled is true`, "turn socketLB off"}},
		{"kube-proxy-replacement disabled, socket LB on", func() Config {
			c := base()
			c.KubeProxyReplacement, c.SocketLB.Enabled = KPRDisabled, true
			return c
		}, []string{`"disabled" but socketLB.enabled`}},
		{"kube-proxy-replacement partial, socket LB on", func() Config {
			c := base()
			c.KubeProxyReplacement, c.SocketLB.Enabled = KPRPartial, true
			return c
		}, nil},
		{"kube-proxy-replacement strict, socket LB on", func() Config {
			c := base()
			c.KubeProxyReplacement, c.SocketLB.Enabled = KPRStrict, true
			return c
		}, nil},
		{"kube-proxy-replacement false, hostPort on", func() Config {
			c := base()
			c.KubeProxyReplacement, c.HostPort.Enabled = KPRFalse, &yes
			return c
		}, []string{`"false" but hostPort.enabled is true`, "portmap"}},
		{"kube-proxy-replacement unknown", func() Config {
			c := base()
			c.KubeProxyReplacement = "probe"
			return c
		}, []string{`kube-proxy-replacement "probe" is not one of`}},
		{"ipam unknown mode", func() Config { c := base(); c.IPAM.Mode = "crd"; return c }, []string{`ipam.mode "crd" is not "eniip" or "none"`}},
		{"ipam none", none, nil},
		{"ipam none with ENI options", func() Config {
			c := none()
			c.InstanceID, c.CloudEndpoint, c.ENIConfigPath, c.AllocateWait = "i-1", "127.0.0.1:1", "/etc/eni/eni_conf", Duration(1)
			return c
		}, []string{`ipam.mode is "none"`, "allocateWait, cloudEndpoint, eniConfigPath, instanceID", `set ipam.mode "eniip"`}},
		{"ipam none with cniConfDir", func() Config { c := none(); c.CNIConfDir = "/etc/cni/net.d"; return c },
			[]string{`cniConfDir is "/etc/cni/net.d"`, "Chaining"}},
		{"ipam none, masquerade without vpcCIDRs", func() Config { c := none(); c.Masquerade.Enabled = true; return c },
			[]string{"masquerade.enabled is true without masquerade.vpcCIDRs"}},
		{"ipam none, masquerade with vpcCIDRs", func() Config {
			c := none()
			c.Masquerade.Enabled, c.Masquerade.VPCCIDRs = true, []string{"10.244.0.0/16"}
			return c
		}, nil},
		{"socket LB cgroup without enabled", func() Config { c := base(); c.SocketLB.Cgroup = "/sys/fs/cgroup"; return c },
			[]string{"socketLB.enabled is false"}},
		{"networkPolicy.enforce and disable_network_policy disagree", func() Config {
			c := base()
			tb := TerwayBool(true)
			c.NetworkPolicy.Enforce, c.DisableNetworkPolicy = &yes, &tb
			return c
		}, []string{"contradict each other"}},
		{"metrics certificate without key", func() Config {
			c := base()
			c.MetricsAddr, c.MetricsTLSCertFile = "127.0.0.1:9464", "/etc/tern/tls.crt"
			return c
		}, []string{"metricsTLSKeyFile"}},
		{"sandboxStatePath relative", func() Config { c := base(); c.SandboxStatePath = "sandboxes.json"; return c },
			[]string{`sandboxStatePath "sandboxes.json" must be an absolute path`}},
		{"sandboxStatePath is the socket", func() Config {
			c := base()
			c.SocketPath, c.SandboxStatePath = "/run/tern/agent.sock", "/run/tern/agent.sock"
			return c
		}, []string{"socketPath and sandboxStatePath"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg(), nil)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted; want an error with %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

// Cilium's spellings of kube-proxy-replacement, from a JSON file as a ConfigMap writes them,
// and what each means for hostPort.
func TestKubeProxyReplacementSpellings(t *testing.T) {
	for _, tc := range []struct {
		json     string
		want     KubeProxyReplacement
		replaces bool
	}{
		{`true`, KPRTrue, true}, {`"true"`, KPRTrue, true}, {`"strict"`, KPRStrict, true}, {`"Strict"`, KPRStrict, true},
		{`false`, KPRFalse, false}, {`"false"`, KPRFalse, false}, {`"disabled"`, KPRDisabled, false},
		{`"partial"`, KPRPartial, false},
	} {
		path := filepath.Join(t.TempDir(), "agent.json")
		os.WriteFile(path, []byte(`{"nodeName":"n1","instanceID":"i-1","kube-proxy-replacement":`+tc.json+`}`), 0o600)
		c, err := LoadConfig(path)
		if err != nil {
			t.Fatalf("%s: %v", tc.json, err)
		}
		if c.KubeProxyReplacement != tc.want || c.KubeProxyReplacement.Replaces() != tc.replaces || c.HostPortEnabled() != tc.replaces {
			t.Errorf("%s read as %q (replaces %v, hostPort %v), want %q (%v)", tc.json, c.KubeProxyReplacement,
				c.KubeProxyReplacement.Replaces(), c.HostPortEnabled(), tc.want, tc.replaces)
		}
	}
	var c Config
	if c.KubeProxyReplacement.Replaces() != true || !c.HostPortEnabled() {
		t.Error("unset kube-proxy-replacement must mean true (hostPort on)")
	}
}

// Every field of the agent's config file is documented in docs/cni.md's table.
func TestEveryConfigOptionDocumented(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join("..", "docs", "cni.md"))
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| (.*?) \\|").FindAllStringSubmatch(string(doc), -1) {
		for _, n := range regexp.MustCompile("`([A-Za-z_.-]+)`").FindAllStringSubmatch(m[1], -1) {
			documented[n[1]] = true
		}
	}
	typ := reflect.TypeOf(Config{})
	for i := 0; i < typ.NumField(); i++ {
		name, _, _ := strings.Cut(typ.Field(i).Tag.Get("json"), ",")
		if name == "" || name == "-" {
			continue
		}
		if !documented[name] {
			t.Errorf("agent config field %q is not in docs/cni.md's agent configuration table", name)
		}
	}
}
