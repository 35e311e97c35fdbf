package deploy_test

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/datapath"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/test/deploy"
	"github.com/tern-net/tern/test/k8s/controlplane"
)

const manifestsDir = "../../deploy/manifests"

// agentUser is how the apiserver sees the DaemonSet's pods.
const agentUser = "system:serviceaccount:kube-system:tern-agent"

var agentGroups = []string{"system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"}

func load(t *testing.T) []deploy.Object {
	t.Helper()
	objs, err := deploy.Load(manifestsDir)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

// find returns the one typed object of kind and name, failing the test if it is missing.
func find[T any](t *testing.T, objs []deploy.Object, kind, name string) T {
	t.Helper()
	for _, o := range objs {
		if o.Raw.GetKind() == kind && o.Raw.GetName() == name {
			v, ok := o.Typed.(T)
			if !ok {
				t.Fatalf("%s decodes to %T", o, o.Typed)
			}
			return v
		}
	}
	var zero T
	t.Fatalf("no %s %s in %s", kind, name, manifestsDir)
	return zero
}

// TestManifestsDecodeStrictly: every document decodes with client-go's scheme and no unknown
// field, and the set of objects is the one deploy/README.md describes. Two kinds are outside
// client-go's scheme: the ServiceMonitor (cross-checked below) and the FixedIP
// CustomResourceDefinition (apiextensions is not a client-go API; the real apiserver's strict
// dry run in TestManifestsAcceptedByAPIServer validates it).
func TestManifestsDecodeStrictly(t *testing.T) {
	objs := load(t)
	var got []string
	for _, o := range objs {
		got = append(got, o.Raw.GetKind()+"/"+o.Raw.GetName())
		if o.Typed == nil && o.Raw.GetKind() != "ServiceMonitor" && o.Raw.GetKind() != "CustomResourceDefinition" {
			t.Errorf("%s: kind unknown to client-go's scheme", o)
		}
		if ns := o.Raw.GetNamespace(); ns != "" && ns != "kube-system" {
			t.Errorf("%s: namespace %q, want kube-system", o, ns)
		}
	}
	sort.Strings(got)
	want := []string{"ClusterRole/tern-agent", "ClusterRoleBinding/tern-agent", "ConfigMap/eni-config",
		"CustomResourceDefinition/fixedips.tern.io", "DaemonSet/tern-agent", "Service/tern-agent-metrics", "ServiceAccount/tern-agent", "ServiceMonitor/tern-agent"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("objects %v, want %v", got, want)
	}
}

// TestStrictDecoderRejectsUnknownFields shows the decoder used above is strict: a misspelt
// field in a DaemonSet is an error, not silently dropped.
func TestStrictDecoderRejectsUnknownFields(t *testing.T) {
	dir := t.TempDir()
	doc := "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: x, namespace: kube-system}\n" +
		"spec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n" +
		"    spec:\n      hostNetwrok: true\n      containers: [{name: c, image: i}]\n"
	if err := os.WriteFile(filepath.Join(dir, "ds.yaml"), []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := deploy.Load(dir)
	if err == nil || !strings.Contains(err.Error(), "hostNetwrok") {
		t.Fatalf("a misspelt field decoded with error %v; want an error naming it", err)
	}
}

// TestConfigMatchesDaemonSet: the agent configuration in the ConfigMap is valid for the agent
// (strict decode, then Validate with the two values the DaemonSet passes as flags), eni_conf
// parses as tern's Terway-compatible eni_conf, and every path the agent uses lies on a volume
// the DaemonSet mounts, with the probes on the metrics port.
func TestConfigMatchesDaemonSet(t *testing.T) {
	objs := load(t)
	cm := find[*corev1.ConfigMap](t, objs, "ConfigMap", "eni-config")
	ds := find[*appsv1.DaemonSet](t, objs, "DaemonSet", "tern-agent")

	path := filepath.Join(t.TempDir(), "agent.json")
	if err := os.WriteFile(path, []byte(cm.Data["agent.json"]), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := agent.LoadConfig(path)
	if err != nil {
		t.Fatalf("agent.json of the ConfigMap: %v", err)
	}
	if cfg.NodeName != "" || cfg.InstanceID != "" {
		t.Errorf("agent.json sets nodeName %q / instanceID %q; the DaemonSet passes them per node", cfg.NodeName, cfg.InstanceID)
	}
	cfg.NodeName, cfg.InstanceID = "node-a", "i-example"
	if err := cfg.Validate(); err != nil {
		t.Errorf("agent.json with the flags: %v", err)
	}
	for field, v := range map[string]string{"cniConfDir": cfg.CNIConfDir, "socketPath": cfg.SocketPath,
		"pinRoot": cfg.PinRoot, "statePath": cfg.StatePath, "metricsAddr": cfg.MetricsAddr, "kubeconfig": cfg.Kubeconfig} {
		if v == "" {
			t.Errorf("agent.json: %s is empty", field)
		}
	}
	if cfg.SocketPath != api.DefaultSocketPath {
		t.Errorf("socketPath %s differs from the conflist's default %s", cfg.SocketPath, api.DefaultSocketPath)
	}

	eni, warnings, err := eniconfig.Parse([]byte(cm.Data["eni_conf"]))
	if err != nil {
		t.Errorf("eni_conf of the ConfigMap: %v", err)
	}
	if len(warnings) > 0 {
		t.Errorf("eni_conf warnings: %v", warnings)
	}

	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork || spec.PriorityClassName != "system-node-critical" || spec.ServiceAccountName != "tern-agent" {
		t.Errorf("pod spec: hostNetwork %v priorityClass %q serviceAccount %q", spec.HostNetwork, spec.PriorityClassName, spec.ServiceAccountName)
	}
	if len(spec.Tolerations) != 1 || spec.Tolerations[0].Operator != corev1.TolerationOpExists || spec.Tolerations[0].Key != "" {
		t.Errorf("tolerations %+v; want one that tolerates every taint", spec.Tolerations)
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	var c *corev1.Container
	for i := range spec.Containers {
		if spec.Containers[i].Name == "tern-agent" {
			c = &spec.Containers[i]
		}
	}
	if c == nil {
		t.Fatal("no tern-agent container")
	}
	// mountOf returns the volume under which p lies in the agent container.
	mountOf := func(p string) (corev1.VolumeMount, bool) {
		for _, m := range c.VolumeMounts {
			if p == m.MountPath || strings.HasPrefix(p, m.MountPath+"/") {
				return m, true
			}
		}
		return corev1.VolumeMount{}, false
	}
	hostPaths := map[string]string{ // agent path → the host path it must persist to
		filepath.Dir(cfg.SocketPath): "/var/run/tern", filepath.Dir(cfg.StatePath): "/var/lib/tern",
		cfg.PinRoot: "/sys/fs/bpf", cfg.CNIConfDir: "/etc/cni/net.d",
	}
	for p, host := range hostPaths {
		m, ok := mountOf(p)
		if !ok {
			t.Errorf("%s: no volume mounted there", p)
			continue
		}
		hp := volumes[m.Name].HostPath
		if hp == nil || !strings.HasPrefix(host, hp.Path) || m.ReadOnly {
			t.Errorf("%s: on volume %s (%+v, read-only %v), want a writable hostPath %s", p, m.Name, hp, m.ReadOnly, host)
		}
	}
	// Files that come from the ConfigMap: mounted from a key it has, not from a subPath (which
	// kubelet never refreshes, and eni_conf is reloaded on change).
	for _, p := range []string{cfg.ENIConfigPath, cfg.Kubeconfig, "/etc/tern/agent.json"} {
		m, ok := mountOf(p)
		if !ok || m.SubPath != "" {
			t.Errorf("%s: mount %+v", p, m)
			continue
		}
		v := volumes[m.Name]
		if v.ConfigMap == nil || v.ConfigMap.Name != cm.Name {
			t.Errorf("%s: volume %s is not the %s ConfigMap", p, m.Name, cm.Name)
			continue
		}
		rel := strings.TrimPrefix(p, m.MountPath+"/")
		found := false
		for _, it := range v.ConfigMap.Items {
			if it.Path == rel {
				found = true
				if _, ok := cm.Data[it.Key]; !ok {
					t.Errorf("%s: key %q is not in the ConfigMap", p, it.Key)
				}
			}
		}
		if !found {
			t.Errorf("%s: volume %s projects no %s", p, m.Name, rel)
		}
	}
	if !strings.Contains(strings.Join(c.Args, " "), "-config /etc/tern/agent.json") {
		t.Errorf("container args do not pass -config /etc/tern/agent.json: %q", c.Args)
	}
	if eni.CredentialPath != "" {
		if m, ok := mountOf(eni.CredentialPath); !ok || volumes[m.Name].HostPath == nil {
			t.Errorf("credential_path %s is not on a hostPath mount", eni.CredentialPath)
		}
	}
	var nodeNameEnv bool
	for _, e := range c.Env {
		if e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName" {
			nodeNameEnv = true
		}
	}
	if !nodeNameEnv || !strings.Contains(strings.Join(c.Args, " "), "-node-name $(NODE_NAME)") {
		t.Error("the node name does not come from the downward API into -node-name")
	}

	// Probes and the metrics Service use the port the agent listens on.
	_, port, _ := strings.Cut(cfg.MetricsAddr, ":")
	if len(c.Ports) != 1 || c.Ports[0].Name != "metrics" || port != strconv.Itoa(int(c.Ports[0].ContainerPort)) {
		t.Errorf("container ports %+v, metricsAddr %s", c.Ports, cfg.MetricsAddr)
	}
	for name, p := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe, "startup": c.StartupProbe} {
		want := "/healthz"
		if name == "readiness" {
			want = "/readyz"
		}
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != want || p.HTTPGet.Port.String() != "metrics" {
			t.Errorf("%s probe %+v; want GET %s on the metrics port", name, p, want)
		}
	}

	// The CNI binary is installed by an init container onto the host's /opt/cni/bin, with
	// tern-agent install-cni (the image has no shell).
	if len(spec.InitContainers) != 1 || len(spec.InitContainers[0].Command) != 3 ||
		spec.InitContainers[0].Command[1] != "install-cni" {
		t.Errorf("init containers %+v; want one running tern-agent install-cni DIR", spec.InitContainers)
	} else if m := spec.InitContainers[0].VolumeMounts; len(m) != 1 || m[0].MountPath != spec.InitContainers[0].Command[2] ||
		volumes[m[0].Name].HostPath == nil || volumes[m[0].Name].HostPath.Path != "/opt/cni/bin" {
		t.Errorf("install-cni mounts %+v; want the host's /opt/cni/bin at its DIR argument", m)
	}

	// A capability list, not privileged; the sysctls through the host's /proc/sys/net.
	if sc := c.SecurityContext; sc == nil || (sc.Privileged != nil && *sc.Privileged) || sc.Capabilities == nil ||
		!slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) == 0 {
		t.Errorf("agent securityContext %+v; want privileged false, drop ALL, add a list", sc)
	}
	procSys := ""
	for _, e := range c.Env {
		if e.Name == datapath.EnvProcSys {
			procSys = e.Value
		}
	}
	if m, ok := mountOf(procSys + "/net"); procSys == "" || !ok || m.ReadOnly || volumes[m.Name].HostPath == nil ||
		volumes[m.Name].HostPath.Path != "/proc/sys/net" || m.MountPath != procSys+"/net" {
		t.Errorf("%s=%q: want the host's /proc/sys/net mounted writable at $%s/net", datapath.EnvProcSys, procSys, datapath.EnvProcSys)
	}

	svc := find[*corev1.Service](t, objs, "Service", "tern-agent-metrics")
	for k, v := range svc.Spec.Selector {
		if ds.Spec.Template.Labels[k] != v {
			t.Errorf("metrics Service selects %s=%s, the pods do not carry it", k, v)
		}
	}
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].TargetPort.String() != "metrics" || svc.Spec.Ports[0].Name != "metrics" {
		t.Errorf("metrics Service ports %+v", svc.Spec.Ports)
	}
	var sm *unstructured.Unstructured
	for _, o := range objs {
		if o.Raw.GetKind() == "ServiceMonitor" {
			sm = o.Raw
		}
	}
	sel, _, _ := unstructured.NestedStringMap(sm.Object, "spec", "selector", "matchLabels")
	for k, v := range sel {
		if svc.Labels[k] != v {
			t.Errorf("ServiceMonitor selects %s=%s, the Service does not carry it", k, v)
		}
	}
	eps, _, _ := unstructured.NestedSlice(sm.Object, "spec", "endpoints")
	if len(eps) != 1 || eps[0].(map[string]any)["port"] != "metrics" {
		t.Errorf("ServiceMonitor endpoints %v; want the metrics port", eps)
	}
}

// agentCapabilities returns the capabilities the DaemonSet gives the agent container.
func agentCapabilities(t *testing.T, objs []deploy.Object) []string {
	t.Helper()
	ds := find[*appsv1.DaemonSet](t, objs, "DaemonSet", "tern-agent")
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name == "tern-agent" && c.SecurityContext != nil && c.SecurityContext.Capabilities != nil {
			var out []string
			for _, a := range c.SecurityContext.Capabilities.Add {
				out = append(out, string(a))
			}
			return out
		}
	}
	t.Fatal("the tern-agent container adds no capabilities")
	return nil
}

// wantRules is the ClusterRole the code needs, and no more; each line names its caller. A
// change in either direction must change this table and the manifest together.
var wantRules = []rbacv1.PolicyRule{
	{APIGroups: []string{""}, Resources: []string{"services"}, Verbs: []string{"list", "watch"}},                            // service/controller informer
	{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"list", "watch"}},      // service/controller informer
	{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"list", "watch"}},                                // agent/kube pod informer (spec.nodeName)
	{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"list", "watch"}},                          // agent/kube NetworkPolicy reconciler
	{APIGroups: []string{"networking.k8s.io"}, Resources: []string{"networkpolicies"}, Verbs: []string{"list", "watch"}},    // agent/kube NetworkPolicy reconciler
	{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"get", "patch", "list", "watch"}},               // ipam/nodereport; agent/kube route janitor (VPC mode)
	{APIGroups: []string{""}, Resources: []string{"nodes/status"}, Verbs: []string{"update"}},                               // ipam/nodereport condition
	{APIGroups: []string{""}, Resources: []string{"events"}, Verbs: []string{"create", "patch"}},                            // client-go recorder, core/v1 sink
	{APIGroups: []string{"tern.io"}, Resources: []string{"fixedips"}, Verbs: []string{"get", "create", "update", "delete"}}, // agent/kube fixed IPs (FixedIP records)
	{APIGroups: []string{"apps"}, Resources: []string{"statefulsets"}, Verbs: []string{"list", "watch"}},                    // agent/kube fixed IPs (hold pass)
	{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},          // agent/metricsauth (metricsAuth "kubernetes")
	{APIGroups: []string{"authorization.k8s.io"}, Resources: []string{"subjectaccessreviews"}, Verbs: []string{"create"}},   // agent/metricsauth
}

// TestManifestsAcceptedByAPIServer starts a real kube-apiserver (RBAC on) and
//   - dry-runs every manifest (server-side, strict field validation), the ServiceMonitor
//     against the Prometheus Operator's CRD installed from testdata/crds;
//   - applies the RBAC objects for real and asks SubjectAccessReviews as the agent's
//     ServiceAccount: every verb the code uses is allowed, verbs it must not have are denied;
//   - checks the ClusterRole equals wantRules exactly.
func TestManifestsAcceptedByAPIServer(t *testing.T) {
	objs := load(t)
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
	ap := withServiceMonitorCRD(ctx, t, rc)
	// The dry run is a real check: a DaemonSet whose selector misses its pods is refused.
	for _, o := range objs {
		if o.Raw.GetKind() == "DaemonSet" {
			bad := o
			bad.Raw = o.Raw.DeepCopy()
			_ = unstructured.SetNestedField(bad.Raw.Object, "other", "spec", "selector", "matchLabels", "app.kubernetes.io/name")
			if err := ap.Create(ctx, bad, true); err == nil {
				t.Fatal("the apiserver accepted a DaemonSet whose selector does not match its template")
			}
		}
	}
	for _, o := range objs {
		t.Run("dry-run "+o.Raw.GetKind()+"/"+o.Raw.GetName(), func(t *testing.T) {
			if !ap.Known(o) {
				t.Fatalf("%s: kind not served", o)
			}
			if err := ap.Create(ctx, o, true); err != nil {
				t.Fatal(err)
			}
		})
	}

	if len(warnings.texts) > 0 {
		t.Errorf("the apiserver warned about the manifests: %q", warnings.texts)
	}

	role := find[*rbacv1.ClusterRole](t, objs, "ClusterRole", "tern-agent")
	if !reflect.DeepEqual(role.Rules, wantRules) {
		t.Errorf("ClusterRole rules\n%+v\nwant exactly\n%+v", role.Rules, wantRules)
	}

	applyRBAC(ctx, t, ap, objs)
	client, err := kubernetes.NewForConfig(cp.RestConfig())
	if err != nil {
		t.Fatal(err)
	}
	type check struct {
		verb, group, resource, subresource, namespace string
	}
	allowed := []check{
		{"list", "", "services", "", ""}, {"watch", "", "services", "", ""},
		{"list", "discovery.k8s.io", "endpointslices", "", ""}, {"watch", "discovery.k8s.io", "endpointslices", "", ""},
		{"list", "", "pods", "", ""}, {"watch", "", "pods", "", ""},
		{"list", "", "namespaces", "", ""}, {"watch", "", "namespaces", "", ""},
		{"list", "networking.k8s.io", "networkpolicies", "", ""}, {"watch", "networking.k8s.io", "networkpolicies", "", ""},
		{"get", "", "nodes", "", ""}, {"patch", "", "nodes", "", ""}, {"update", "", "nodes", "status", ""},
		{"create", "", "events", "", "default"}, {"patch", "", "events", "", "default"},
		{"create", "authentication.k8s.io", "tokenreviews", "", ""}, {"create", "authorization.k8s.io", "subjectaccessreviews", "", ""},
		{"get", "tern.io", "fixedips", "", "default"}, {"create", "tern.io", "fixedips", "", "default"},
		{"update", "tern.io", "fixedips", "", "default"}, {"delete", "tern.io", "fixedips", "", "default"},
		{"list", "apps", "statefulsets", "", ""}, {"watch", "apps", "statefulsets", "", ""},
	}
	denied := []check{
		{"delete", "", "pods", "", "default"}, {"create", "", "pods", "", "default"}, {"get", "", "pods", "", "default"},
		{"create", "", "pods", "exec", "default"}, {"create", "", "pods", "eviction", "default"},
		{"get", "", "secrets", "", "kube-system"}, {"list", "", "secrets", "", ""},
		{"get", "", "configmaps", "", "kube-system"},
		{"update", "", "nodes", "", ""}, {"delete", "", "nodes", "", ""}, {"create", "", "nodes", "", ""},
		{"patch", "", "nodes", "status", ""},
		{"update", "", "services", "", "default"}, {"get", "", "services", "", "default"},
		{"create", "discovery.k8s.io", "endpointslices", "", "default"},
		{"create", "events.k8s.io", "events", "", "default"}, {"delete", "", "events", "", "default"},
		{"create", "", "serviceaccounts", "token", "kube-system"},
		{"escalate", "rbac.authorization.k8s.io", "clusterroles", "", ""},
		{"impersonate", "", "users", "", ""}, {"impersonate", "", "serviceaccounts", "", "kube-system"},
		{"create", "certificates.k8s.io", "certificatesigningrequests", "", ""},
		{"list", "tern.io", "fixedips", "", ""}, {"patch", "tern.io", "fixedips", "", "default"},
		{"update", "apps", "statefulsets", "", "default"}, {"get", "apps", "statefulsets", "", "default"},
		{"create", "apiextensions.k8s.io", "customresourcedefinitions", "", ""},
	}
	ask := func(c check) bool {
		t.Helper()
		r, err := client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
			Spec: authorizationv1.SubjectAccessReviewSpec{User: agentUser, Groups: agentGroups,
				ResourceAttributes: &authorizationv1.ResourceAttributes{Verb: c.verb, Group: c.group, Resource: c.resource,
					Subresource: c.subresource, Namespace: c.namespace}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return r.Status.Allowed
	}
	for _, c := range allowed {
		if !ask(c) {
			t.Errorf("the agent may not %s %s.%s/%s in %q; the code needs it", c.verb, c.resource, c.group, c.subresource, c.namespace)
		}
	}
	for _, c := range denied {
		if ask(c) {
			t.Errorf("the agent may %s %s.%s/%s in %q; it must not", c.verb, c.resource, c.group, c.subresource, c.namespace)
		}
	}
	t.Logf("SubjectAccessReviews as %s: %d allowed, %d denied as expected", agentUser, len(allowed), len(denied))
}

// warningLog keeps the apiserver's Warning headers (deprecated fields, ignored values).
type warningLog struct{ texts []string }

func (w *warningLog) HandleWarningHeader(_ int, _ string, text string) {
	w.texts = append(w.texts, text)
}

// applyRBAC creates the ServiceAccount, ClusterRole and ClusterRoleBinding for real.
func applyRBAC(ctx context.Context, t *testing.T, ap *deploy.Applier, objs []deploy.Object) {
	t.Helper()
	for _, o := range rbacObjects(objs) {
		if err := ap.Create(ctx, o, false); err != nil {
			t.Fatal(err)
		}
	}
}

func rbacObjects(objs []deploy.Object) []deploy.Object {
	var out []deploy.Object
	for _, o := range objs {
		switch o.Raw.GetKind() {
		case "ServiceAccount", "ClusterRole", "ClusterRoleBinding":
			out = append(out, o)
		}
	}
	return out
}

// withServiceMonitorCRD installs the ServiceMonitor CRD (testdata/crds) and returns an
// Applier that knows the kind, once the apiserver serves it.
func withServiceMonitorCRD(ctx context.Context, t *testing.T, rc *rest.Config) *deploy.Applier {
	t.Helper()
	crds, err := deploy.Load("testdata/crds")
	if err != nil {
		t.Fatal(err)
	}
	ap, err := deploy.NewApplier(rc)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range crds {
		if err := ap.Create(ctx, c, false); err != nil {
			t.Fatalf("install CRD: %v", err)
		}
	}
	monitor := deploy.Object{Raw: &unstructured.Unstructured{}}
	monitor.Raw.SetAPIVersion("monitoring.coreos.com/v1")
	monitor.Raw.SetKind("ServiceMonitor")
	// Discovery shows the kind once the CRD is established.
	for {
		if ap, err = deploy.NewApplier(rc); err == nil && ap.Known(monitor) {
			return ap
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the apiserver does not serve ServiceMonitor after installing its CRD (last error %v)", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
