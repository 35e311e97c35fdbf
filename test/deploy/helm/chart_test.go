// Package helm_test renders, lints and dry-runs deploy/helm/tern with the Helm Go module.
// It is its own Go module so that Helm's dependencies stay out of the agent's go.mod.
package helm_test

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"helm.sh/helm/v4/pkg/action"
	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/common/util"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/test/deploy"
	"github.com/tern-net/tern/test/k8s/controlplane"
)

const (
	chartDir     = "../../../deploy/helm/tern"
	manifestsDir = "../../../deploy/manifests"
	namespace    = "kube-system"
)

// render renders the chart with vals as `helm template -n kube-system tern` would and decodes
// the result strictly (test/deploy's loader: unknown fields are errors).
func render(t *testing.T, vals map[string]any) []deploy.Object {
	t.Helper()
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	rv, err := util.ToRenderValues(ch, vals, common.ReleaseOptions{Name: "tern", Namespace: namespace, IsInstall: true}, common.DefaultCapabilities)
	if err != nil {
		t.Fatal(err)
	}
	out, err := engine.Render(ch, rv)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for name, body := range out {
		if !strings.HasSuffix(name, ".yaml") || strings.TrimSpace(body) == "" {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(name)), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	objs, err := deploy.Load(dir)
	if err != nil {
		t.Fatalf("rendered chart: %v", err)
	}
	return objs
}

func find[T any](t *testing.T, objs []deploy.Object, kind, name string) T {
	t.Helper()
	for _, o := range objs {
		if o.Raw.GetKind() == kind && o.Raw.GetName() == name {
			if v, ok := o.Typed.(T); ok {
				return v
			}
		}
	}
	var zero T
	t.Fatalf("no %s %s rendered", kind, name)
	return zero
}

func TestChartLints(t *testing.T) {
	l := action.NewLint()
	l.Strict = true
	l.Namespace = namespace
	res := l.Run([]string{chartDir}, nil)
	for _, m := range res.Messages {
		t.Log(m)
	}
	if len(res.Errors) > 0 || res.TotalChartsLinted != 1 {
		t.Fatalf("helm lint --strict: %v", res.Errors)
	}
}

// TestChartRenders: the default values give the objects of deploy/manifests with the same RBAC
// rules; agent.json and eni_conf pass the agent's own strict parsers; the DaemonSet has the
// host network, the bpffs and cgroup2 mounts, an unprivileged tern-cni install, a rolling
// update and the priority class. By default the agent gets deploy/manifests' capability list;
// agent.privileged=true gives privilege instead, and priorityClass.create a PriorityClass.
func TestChartRenders(t *testing.T) {
	objs := render(t, nil)
	var kinds []string
	for _, o := range objs {
		kinds = append(kinds, o.Raw.GetKind()+"/"+o.Raw.GetName())
		if o.Raw.GetNamespace() != "" && o.Raw.GetNamespace() != namespace {
			t.Errorf("%s in namespace %q", o, o.Raw.GetNamespace())
		}
	}
	t.Logf("rendered: %v", kinds)

	manifests, err := deploy.Load(manifestsDir)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := find[*rbacv1.ClusterRole](t, objs, "ClusterRole", "tern-agent").Rules,
		find[*rbacv1.ClusterRole](t, manifests, "ClusterRole", "tern-agent").Rules; !reflect.DeepEqual(got, want) {
		t.Errorf("chart ClusterRole rules\n%+v\nwant deploy/manifests' (proven by test/deploy)\n%+v", got, want)
	}

	cm := find[*corev1.ConfigMap](t, objs, "ConfigMap", "eni-config")
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "agent.json"), []byte(cm.Data["agent.json"]), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := agent.LoadConfig(filepath.Join(dir, "agent.json"))
	if err != nil {
		t.Fatalf("agent.json the chart renders: %v", err)
	}
	if cfg.PinRoot != "/sys/fs/bpf/tern" || cfg.MetricsAddr != ":9464" {
		t.Errorf("agent.json: %+v", cfg)
	}
	if _, _, err := eniconfig.Parse([]byte(cm.Data["eni_conf"])); err != nil {
		t.Errorf("eni_conf the chart renders: %v", err)
	}

	ds := find[*appsv1.DaemonSet](t, objs, "DaemonSet", "tern-agent")
	spec := ds.Spec.Template.Spec
	ru := ds.Spec.UpdateStrategy.RollingUpdate
	if ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType || ru == nil || *ru.MaxUnavailable != intstr.FromInt32(1) {
		t.Errorf("update strategy %+v", ds.Spec.UpdateStrategy)
	}
	if !spec.HostNetwork || spec.PriorityClassName != "system-node-critical" || spec.ServiceAccountName != "tern-agent" {
		t.Errorf("hostNetwork %v, priority class %q, service account %q", spec.HostNetwork, spec.PriorityClassName, spec.ServiceAccountName)
	}
	host := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			host[v.Name] = v.HostPath.Path
		}
	}
	if host["bpffs"] != "/sys/fs/bpf" || host["cgroup2"] != "/sys/fs/cgroup" || host["cni-bin"] != "/opt/cni/bin" {
		t.Errorf("host paths %v", host)
	}
	if len(spec.InitContainers) != 1 || spec.InitContainers[0].Name != "install-cni" ||
		spec.InitContainers[0].SecurityContext.Capabilities.Drop[0] != "ALL" ||
		!reflect.DeepEqual(spec.InitContainers[0].Command, []string{"/usr/local/bin/tern-agent", "install-cni", "/host/opt/cni/bin"}) {
		t.Errorf("init containers %+v; want only install-cni, run by tern-agent (the image has no shell)", spec.InitContainers)
	}
	// By default a capability list, the same one deploy/manifests has (the list test/deploy
	// runs the real agent with), and sysctls through the host's /proc/sys/net.
	sc := spec.Containers[0].SecurityContext
	if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.Capabilities == nil {
		t.Fatalf("agent security context by default: %+v; want a capability list, not privileged", sc)
	}
	var want []corev1.Capability
	for _, c := range find[*appsv1.DaemonSet](t, manifests, "DaemonSet", "tern-agent").Spec.Template.Spec.Containers {
		if c.Name == "tern-agent" && c.SecurityContext != nil && c.SecurityContext.Capabilities != nil {
			want = c.SecurityContext.Capabilities.Add
		}
	}
	if len(want) == 0 || !reflect.DeepEqual(sc.Capabilities.Add, want) || sc.Capabilities.Drop[0] != "ALL" {
		t.Errorf("capabilities %+v, want add %v (deploy/manifests') drop ALL", sc.Capabilities, want)
	}
	env := map[string]string{}
	for _, e := range spec.Containers[0].Env {
		env[e.Name] = e.Value
	}
	procMount := ""
	for _, m := range spec.Containers[0].VolumeMounts {
		if host[m.Name] == "/proc/sys/net" && !m.ReadOnly {
			procMount = m.MountPath
		}
	}
	if env["TERN_PROC_SYS"] == "" || procMount != env["TERN_PROC_SYS"]+"/net" {
		t.Errorf("TERN_PROC_SYS=%q, host /proc/sys/net mounted at %q; want it at $TERN_PROC_SYS/net", env["TERN_PROC_SYS"], procMount)
	}

	objs = render(t, map[string]any{"agent": map[string]any{"privileged": true}, "priorityClass": map[string]any{"create": true, "name": "tern-node-critical"}})
	ds = find[*appsv1.DaemonSet](t, objs, "DaemonSet", "tern-agent")
	spec = ds.Spec.Template.Spec
	if sc := spec.Containers[0].SecurityContext; sc == nil || sc.Privileged == nil || !*sc.Privileged || sc.Capabilities != nil {
		t.Errorf("agent security context with agent.privileged=true: %+v", sc)
	}
	if !hasObject(objs, "PriorityClass", "tern-node-critical") || spec.PriorityClassName != "tern-node-critical" {
		t.Errorf("priority class %q", spec.PriorityClassName)
	}
}

type warningLog struct{ texts []string }

func (w *warningLog) HandleWarningHeader(_ int, _ string, text string) {
	w.texts = append(w.texts, text)
}

// TestChartAcceptedByAPIServer: every object the chart renders, with the default values and
// with capabilities instead of privilege, passes a server-side dry run on a real apiserver
// with strict field validation and no warning.
func TestChartAcceptedByAPIServer(t *testing.T) {
	if _, err := controlplane.BinDir(); err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
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
	rc := cp.RestConfig()
	warnings := &warningLog{}
	rc.WarningHandler = warnings
	ap, err := deploy.NewApplier(rc)
	if err != nil {
		t.Fatal(err)
	}
	for _, vals := range []map[string]any{nil, {"agent": map[string]any{"privileged": true}, "priorityClass": map[string]any{"create": true, "name": "tern-node-critical"}}} {
		for _, o := range render(t, vals) {
			if err := ap.Create(ctx, o, true); err != nil {
				t.Errorf("values %v: %v", vals, err)
			}
		}
	}
	if len(warnings.texts) > 0 {
		t.Errorf("the apiserver warned: %q", warnings.texts)
	}
}

func hasObject(objs []deploy.Object, kind, name string) bool {
	for _, o := range objs {
		if o.Raw.GetKind() == kind && o.Raw.GetName() == name {
			return true
		}
	}
	return false
}

// TestGOMEMLIMITFollowsTheMemoryLimit: a container memory limit becomes the agent's
// GOMEMLIMIT (from the limit itself, in bytes); without one there is no GOMEMLIMIT.
func TestGOMEMLIMITFollowsTheMemoryLimit(t *testing.T) {
	envOf := func(vals map[string]any) map[string]corev1.EnvVar {
		ds := find[*appsv1.DaemonSet](t, render(t, vals), "DaemonSet", "tern-agent")
		out := map[string]corev1.EnvVar{}
		for _, e := range ds.Spec.Template.Spec.Containers[0].Env {
			out[e.Name] = e
		}
		return out
	}
	if e, ok := envOf(nil)["GOMEMLIMIT"]; ok {
		t.Errorf("default values set GOMEMLIMIT: %+v", e)
	}
	e, ok := envOf(map[string]any{"agent": map[string]any{"resources": map[string]any{
		"limits": map[string]any{"memory": "200Mi"}}}})["GOMEMLIMIT"]
	if !ok || e.ValueFrom == nil || e.ValueFrom.ResourceFieldRef == nil || e.ValueFrom.ResourceFieldRef.Resource != "limits.memory" ||
		e.ValueFrom.ResourceFieldRef.Divisor.String() != "1" {
		t.Errorf("with limits.memory: GOMEMLIMIT %+v, want from the limits.memory resource field, divisor 1", e)
	}
}
