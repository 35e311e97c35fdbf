package helm_test

import (
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"

	"helm.sh/helm/v4/pkg/chart/v2/loader"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/test/deploy"
)

// agentOptions lists every agent.json key (dotted for nested blocks) from agent.Config's JSON
// tags, so an option added to the agent is an option the chart's values must name.
func agentOptions(t reflect.Type, prefix string) []string {
	var out []string
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "" || name == "-" {
			continue
		}
		if f.Type.Kind() == reflect.Struct {
			out = append(out, agentOptions(f.Type, prefix+name+".")...)
			continue
		}
		out = append(out, prefix+name)
	}
	return out
}

// valueKeys lists a values map's leaf keys the same way.
func valueKeys(m map[string]any, prefix string) []string {
	var out []string
	for k, v := range m {
		if sub, ok := v.(map[string]any); ok && !isFreeForm(prefix+k) {
			out = append(out, valueKeys(sub, prefix+k+".")...)
			continue
		}
		out = append(out, prefix+k)
	}
	sort.Strings(out)
	return out
}

// isFreeForm: maps whose keys are data (zones, tags, labels), not options.
func isFreeForm(key string) bool {
	return key == "vswitches" || key == "eni_tags" || key == "nodeLabels"
}

// TestChartValuesNameEveryOption: values.yaml's agentConfig has a value for every option of
// agent.Config and eniConf for every eni_conf field tern reads, and nothing else. An option
// added to the agent without a chart value fails here.
func TestChartValuesNameEveryOption(t *testing.T) {
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		values string
		want   []string
		exempt map[string]string
	}{
		{"agentConfig", agentOptions(reflect.TypeFor[agent.Config](), ""),
			map[string]string{"nodeName": "passed as -node-name from the downward API"}},
		{"eniConf", eniconfig.Fields(), nil},
	} {
		vals, ok := ch.Values[tc.values].(map[string]any)
		if !ok {
			t.Fatalf("values.yaml has no %s map", tc.values)
		}
		have := valueKeys(vals, "")
		for _, k := range tc.want {
			if _, ok := tc.exempt[k]; !ok && !slices.Contains(have, k) {
				t.Errorf("values.yaml %s has no value for %q: add it (\"\" for the default) with a comment", tc.values, k)
			}
		}
		for _, k := range have {
			if !slices.Contains(tc.want, k) {
				t.Errorf("values.yaml %s.%s is not an option the agent reads", tc.values, k)
			}
			if _, ok := tc.exempt[k]; ok {
				t.Errorf("values.yaml %s.%s: %s", tc.values, k, tc.exempt[k])
			}
		}
	}
}

// renderAgentConfig renders the chart with vals and reads its agent.json with the agent's own
// loader, then builds an agent from it (agent.New: defaults and every validation, nothing
// touched), as tern-agent does at start with -node-name.
func renderAgentConfig(t *testing.T, vals map[string]any) (agent.Config, string) {
	t.Helper()
	cm := find[*corev1.ConfigMap](t, render(t, vals), "ConfigMap", "eni-config")
	path := filepath.Join(t.TempDir(), "agent.json")
	if err := os.WriteFile(path, []byte(cm.Data["agent.json"]), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := agent.LoadConfig(path)
	if err != nil {
		t.Fatalf("values %v: agent.json the chart renders: %v\n%s", vals, err, cm.Data["agent.json"])
	}
	cfg.NodeName = "node-a"
	a, err := agent.New(cfg, nil)
	if err != nil {
		t.Fatalf("values %v: the agent refuses the rendered agent.json: %v\n%s", vals, err, cm.Data["agent.json"])
	}
	return a.Config(), cm.Data["eni_conf"]
}

// TestChartAgentModes renders the values an operator sets for each mode and feature and
// checks the agent reads what was meant: NetworkPolicy (both spellings), chaining (ipam.mode
// none: no ENI options, no conflist), hostPort, kube-proxy-replacement, the VPC route mode,
// masquerade, bandwidth and socket LB; and every eni_conf field set.
func TestChartAgentModes(t *testing.T) {
	type m = map[string]any
	ac := func(v m) m { return m{"agentConfig": v} }
	for _, tc := range []struct {
		name  string
		vals  m
		check func(agent.Config) bool
	}{
		{"defaults", nil, func(c agent.Config) bool {
			return !c.IPAM.Off() && c.PolicyEnforced() && c.HostPortEnabled() && c.KubeProxyReplacement.Replaces() &&
				c.CNIConfDir == "/etc/cni/net.d" && c.Kubeconfig == "/etc/tern/kubeconfig" && !c.Masquerade.Enabled && !c.SocketLB.Enabled
		}},
		{"networkPolicy off, audit", ac(m{"networkPolicy": m{"enforce": false, "audit": true, "auditNamespaces": []any{"dev"}, "allowedEvents": true}}),
			func(c agent.Config) bool {
				return !c.PolicyEnforced() && c.NetworkPolicy.Audit && slices.Equal(c.NetworkPolicy.AuditNamespaces, []string{"dev"}) && c.NetworkPolicy.AllowedEvents
			}},
		{"Terway's disable_network_policy", ac(m{"disable_network_policy": "true"}), func(c agent.Config) bool { return !c.PolicyEnforced() }},
		{"chaining (ipam.mode none)", ac(m{"ipam": m{"mode": "none"}, "masquerade": m{"enabled": true, "vpcCIDRs": []any{"10.0.0.0/8"}}}),
			func(c agent.Config) bool {
				return c.IPAM.Off() && c.CNIConfDir == "" && c.ENIConfigPath == "" && c.StatePath == "" && c.ClusterID == "" && c.Masquerade.Enabled
			}},
		{"hostPort off", ac(m{"hostPort": m{"enabled": false}}), func(c agent.Config) bool { return !c.HostPortEnabled() }},
		{"beside kube-proxy", ac(m{"kube-proxy-replacement": false}), func(c agent.Config) bool {
			return !c.KubeProxyReplacement.Replaces() && !c.HostPortEnabled()
		}},
		{"partial replacement", ac(m{"kube-proxy-replacement": "partial", "hostPort": m{"enabled": true}, "socketLB": m{"enabled": true}}),
			func(c agent.Config) bool {
				return c.KubeProxyReplacement == agent.KPRPartial && c.HostPortEnabled() && c.SocketLB.Enabled
			}},
		{"VPC route mode", ac(m{"daemonMode": "VPC", "routeTableID": "vtb-1", "routeCheckInterval": "2m"}), func(c agent.Config) bool {
			mode, _ := c.Mode()
			return mode == agent.ModeVPC && c.RouteTableID == "vtb-1" && c.RouteCheckInterval == agent.Duration(120e9)
		}},
		{"masquerade", ac(m{"masquerade": m{"enabled": true, "nonMasqueradeCIDRs": []any{"100.64.0.0/10"}, "masqLinkLocal": true,
			"portMin": 2048, "portTries": 16, "maxFlows": 65536, "gcInterval": "1m"}}), func(c agent.Config) bool {
			mq := c.Masquerade
			return mq.Enabled && slices.Equal(mq.NonMasqueradeCIDRs, []string{"100.64.0.0/10"}) && mq.MasqLinkLocal &&
				mq.PortMin == 2048 && mq.PortTries == 16 && mq.MaxFlows == 65536 && mq.GCInterval == agent.Duration(60e9)
		}},
		{"bandwidth EDT", ac(m{"bandwidthMode": "edt"}), func(c agent.Config) bool { return c.BandwidthMode == "edt" }},
		{"socket LB on the host's cgroup2", ac(m{"socketLB": m{"enabled": true}}), func(c agent.Config) bool {
			return c.SocketLB.Enabled && c.SocketLB.Cgroup == "/run/tern/cgroupv2"
		}},
		{"map sizes and Maglev", ac(m{"maxServices": 1024, "maxBackends": 4096, "maxFlows": 1 << 20, "lbAlgorithm": "maglev", "maglevTableSize": 1021}),
			func(c agent.Config) bool {
				return c.MaxServices == 1024 && c.MaxBackends == 4096 && c.MaxFlows == 1<<20 && c.LBAlgorithm == "maglev" && c.MaglevTableSize == 1021
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, _ := renderAgentConfig(t, tc.vals)
			if !tc.check(cfg) {
				t.Errorf("the agent read %+v", cfg)
			}
		})
	}

	t.Run("every eni_conf field", func(t *testing.T) {
		_, doc := renderAgentConfig(t, map[string]any{"eniConf": map[string]any{
			"access_key": "ak", "access_secret": "sk", "security_groups": []any{"sg-2"}, "eni_tags": map[string]any{"team": "net"},
			"ip_warm_up_size": 2, "idle_ip_reclaim_after": "30m", "eni_selection_policy": "least_ips", "ipam_type": "default",
			"hot_plug": false}})
		c, warnings, err := eniconfig.Parse([]byte(doc))
		if err != nil || len(warnings) > 0 {
			t.Fatalf("eni_conf the chart renders: %v %v\n%s", err, warnings, doc)
		}
		if c.AccessKey != "ak" || !slices.Equal(c.SecurityGroups, []string{"sg-replace-with-your-security-group", "sg-2"}) ||
			c.ENITags["team"] != "net" || c.IPWarmUpSize != 2 || c.IdleIPReclaimAfter.Minutes() != 30 ||
			c.ENISelection != eniconfig.ENILeastIPs || c.HotPlug || c.MaxPoolSize != 5 {
			t.Errorf("eni_conf read as %+v", c)
		}
	})
}

// TestChartRBACMatchesManifests: the chart's ServiceAccount, ClusterRole and binding are
// deploy/manifests' (the ones test/deploy proves rule by rule): same names, namespace, rules,
// role reference and subjects, and no other RBAC object.
func TestChartRBACMatchesManifests(t *testing.T) {
	chart := render(t, nil)
	manifests, err := deploy.Load(manifestsDir)
	if err != nil {
		t.Fatal(err)
	}
	rbac := func(objs []deploy.Object) []string {
		var out []string
		for _, o := range objs {
			switch o.Raw.GetKind() {
			case "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding":
				out = append(out, o.Raw.GetKind()+" "+o.Raw.GetNamespace()+"/"+o.Raw.GetName())
			}
		}
		sort.Strings(out)
		return out
	}
	if got, want := rbac(chart), rbac(manifests); !slices.Equal(got, want) {
		t.Fatalf("chart RBAC objects %v, deploy/manifests' %v", got, want)
	}
	if got, want := find[*rbacv1.ClusterRole](t, chart, "ClusterRole", "tern-agent").Rules,
		find[*rbacv1.ClusterRole](t, manifests, "ClusterRole", "tern-agent").Rules; !reflect.DeepEqual(got, want) {
		t.Errorf("chart ClusterRole rules\n%+v\ndeploy/manifests'\n%+v", got, want)
	}
	gb, wb := find[*rbacv1.ClusterRoleBinding](t, chart, "ClusterRoleBinding", "tern-agent"),
		find[*rbacv1.ClusterRoleBinding](t, manifests, "ClusterRoleBinding", "tern-agent")
	if !reflect.DeepEqual(gb.RoleRef, wb.RoleRef) || !reflect.DeepEqual(gb.Subjects, wb.Subjects) {
		t.Errorf("chart binding %+v %+v, deploy/manifests' %+v %+v", gb.RoleRef, gb.Subjects, wb.RoleRef, wb.Subjects)
	}
	ds := find[*appsv1.DaemonSet](t, chart, "DaemonSet", "tern-agent")
	if sa := ds.Spec.Template.Spec.ServiceAccountName; sa != wb.Subjects[0].Name {
		t.Errorf("the chart's DaemonSet runs as %q, its binding names %q", sa, wb.Subjects[0].Name)
	}
}
