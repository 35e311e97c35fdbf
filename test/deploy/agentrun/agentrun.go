//go:build linux

// Package agentrun runs the real tern-agent in a Kubernetes lab with the identity and the
// capabilities a deployment gives it: the ServiceAccount, ClusterRole and binding of a set
// of rendered objects (deploy/manifests, or the Helm chart rendered by test/deploy/helm), the
// kubeconfig of their ConfigMap carrying a token of that ServiceAccount, and their DaemonSet's
// capability list. Both deployments are proven by the same run.
package agentrun

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/ipam/nodereport"
	"github.com/tern-net/tern/test/deploy"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/k8s/controlplane"
	"github.com/tern-net/tern/test/lab"
)

// The paths the deployment's kubeconfig reads: the kubelet mounts the pod's ServiceAccount
// token and the cluster CA there.
const (
	saTokenPath = "/var/run/secrets/kubernetes.io/serviceaccount/token"
	saCAPath    = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
)

// AgentUser is how the apiserver sees the DaemonSet's pods.
const AgentUser = "system:serviceaccount:kube-system:tern-agent"

// WithServiceAccount runs the real tern-agent in a Kubernetes lab with the RBAC objects of
// objs applied and, instead of the lab's admin kubeconfig, the ConfigMap's
// kubeconfig carrying a token minted for the tern-agent ServiceAccount (TokenRequest API), the
// way the DaemonSet's pod would run. With that identity only, the agent
//   - serves a ClusterIP Service end to end (Services and EndpointSlices listed and watched);
//   - enforces a NetworkPolicy (Namespaces, Pods and NetworkPolicies listed and watched);
//   - writes the Node's IPAM annotations and its TernPodIPsExhausted condition (nodes get and
//     patch, nodes/status update), flipping it to True when a /29 vSwitch runs out;
//   - records the TernPodIPsExhausted Warning Event on the pod that got no address (events
//     create);
//   - and its log never says "forbidden" (the pod informer's list and watch included).
//
// It also runs with only the capabilities the DaemonSet adds (the bounding set cut to them,
// as a runtime does for drop ALL + add), checked in the process's CapEff: loading and
// attaching the programs, pinning, writing the maps and serving the ClusterIP all happen
// with that list.
func WithServiceAccount(t *testing.T, objs []deploy.Object) {
	t.Helper()
	testutil.RequirePrivileged(t)
	if _, err := controlplane.BinDir(); err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	cm := find[*corev1.ConfigMap](t, objs, "ConfigMap", "eni-config")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	binDir := t.TempDir()
	if err := lab.BuildBinaries(ctx, binDir); err != nil {
		t.Fatal(err)
	}
	credDir := t.TempDir()
	var agentKubeconfig string
	withServiceAccount := func(ctx context.Context, l *lab.Lab, _ *lab.Node) (string, error) {
		if agentKubeconfig != "" { // one identity for every node, as one DaemonSet has
			return agentKubeconfig, nil
		}
		ap, err := deploy.NewApplier(l.RestConfig())
		if err != nil {
			return "", err
		}
		for _, o := range rbacObjects(objs) {
			if err := ap.Create(ctx, o, false); err != nil {
				return "", err
			}
		}
		expiry := int64(3600)
		tr, err := l.Client().CoreV1().ServiceAccounts("kube-system").CreateToken(ctx, "tern-agent",
			&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &expiry}}, metav1.CreateOptions{})
		if err != nil {
			return "", fmt.Errorf("mint a token for kube-system/tern-agent: %w", err)
		}
		agentKubeconfig, err = WriteKubeconfig(credDir, cm.Data["kubeconfig"], l.ControlPlane().APIServerURL(),
			l.RestConfig().CAData, tr.Status.Token)
		return agentKubeconfig, err
	}

	const tiny = "vsw-deploy-tiny" // a /29: four addresses, each a pod's (the ENI's primary too)
	caps := capabilities(t, objs)
	var wantCapEff uint64
	for _, c := range caps {
		n, ok := capabilityNumbers[c]
		if !ok {
			t.Fatalf("the DaemonSet adds capability %q, which this test does not know", c)
		}
		wantCapEff |= 1 << n
	}
	l, err := lab.Up(ctx, lab.Options{Nodes: 1, BinDir: binDir, Kubernetes: true, AgentKubeconfig: withServiceAccount,
		AgentCapabilities: caps,
		ExtraVSwitches:    []ecsemu.VSwitchConfig{{ID: tiny, Zone: lab.Zone, CIDR: "192.168.40.0/29"}},
		ENIConf:           lab.ENIConf{VSwitches: []string{tiny}, MaxPoolSize: 3},
		Logger:            zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)).Named("lab")})
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	node := l.Node(0)
	t.Cleanup(func() {
		if t.Failed() {
			if b, err := os.ReadFile(node.AgentLog()); err == nil {
				if len(b) > 20000 {
					b = b[len(b)-20000:]
				}
				t.Logf("=== agent log of %s (tail) ===\n%s", node.Name, b)
			}
		}
		if err := l.Down(); err != nil {
			t.Errorf("lab down: %v", err)
		}
	})

	// The agent really runs with the list and nothing more.
	if got, err := node.AgentCapabilities(); err != nil || got != wantCapEff {
		t.Fatalf("agent CapEff = %#x, %v; want %#x (%v)", got, err, wantCapEff, caps)
	}

	// The agent's kubeconfig really is the ServiceAccount, not an admin.
	rc, err := clientcmd.BuildConfigFromFlags("", agentKubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	as, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	who, err := as.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if who.Status.UserInfo.Username != AgentUser {
		t.Fatalf("the agent's kubeconfig authenticates as %q, want %q", who.Status.UserInfo.Username, AgentUser)
	}
	if _, err := as.CoreV1().Secrets("kube-system").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Fatalf("listing secrets with the agent's kubeconfig: %v; want forbidden", err)
	}

	// A ClusterIP Service with one backend, reached from a client pod.
	c := l.Client()
	const ns = "web"
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("http"), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "web-0", Node: node.Name,
		Labels: map[string]string{"app": "web"}, HTTPPort: 8080}); err != nil {
		t.Fatal(err)
	}
	client, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "client", Node: node.Name})
	if err != nil {
		t.Fatal(err)
	}
	url := "http://" + svc.Spec.ClusterIP + ":80/"
	waitFor(ctx, t, 30*time.Second, "an answer from web-0 through "+url, func() (bool, string) {
		body, err := client.HTTPGet(ctx, url)
		return err == nil && strings.HasPrefix(body, "hello from web-0"), fmt.Sprintf("%q %v", body, err)
	})

	// NetworkPolicy (Namespaces, Pods and NetworkPolicies listed and watched): web-0 admits
	// only app=web pods, so the client goes unanswered once the rules are in the maps.
	if _, err := c.NetworkingV1().NetworkPolicies(ns).Create(ctx, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "web-friends"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}}}}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, 30*time.Second, "the client denied by NetworkPolicy web-friends", func() (bool, string) {
		dctx, dcancel := context.WithTimeout(ctx, time.Second)
		defer dcancel()
		body, err := client.HTTPGet(dctx, url)
		return err != nil, fmt.Sprintf("answered %q", body)
	})

	// The Node report: annotations by patch, the condition by get + update of the status.
	conditionIs := func(status corev1.ConditionStatus) func() (bool, string) {
		return func() (bool, string) {
			n, err := c.CoreV1().Nodes().Get(ctx, node.Name, metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			if n.Annotations[nodereport.AnnotationAllocatedENIIPs] == "" || n.Annotations[nodereport.AnnotationMaxAvailableIP] == "" {
				return false, fmt.Sprintf("annotations %v", n.Annotations)
			}
			for _, cond := range n.Status.Conditions {
				if cond.Type == nodereport.ConditionIPExhausted {
					return cond.Status == status, fmt.Sprintf("condition %+v", cond)
				}
			}
			return false, "no condition " + string(nodereport.ConditionIPExhausted)
		}
	}
	waitFor(ctx, t, 30*time.Second, "IPAM annotations and "+string(nodereport.ConditionIPExhausted)+"=False on "+node.Name,
		conditionIs(corev1.ConditionFalse))

	// Run out of addresses: the pod that gets none has a Warning Event, the Node says so.
	var starved string
	for i := range 3 {
		name := fmt.Sprintf("extra-%d", i)
		_, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: name, Node: node.Name})
		if err == nil {
			continue
		}
		if te, ok := lab.CNIError(err); !ok || te.Code != 100 {
			t.Fatalf("pod %s: %v; want CNI error 100 (vSwitch exhausted)", name, err)
		}
		starved = name
		break
	}
	if starved == "" {
		t.Fatalf("every pod got an address from the /29 %s", tiny)
	}
	waitFor(ctx, t, 30*time.Second, "a TernPodIPsExhausted Event on "+starved, func() (bool, string) {
		evs, err := c.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + starved})
		if err != nil {
			return false, err.Error()
		}
		for _, e := range evs.Items {
			if e.Reason == "TernPodIPsExhausted" && e.Type == corev1.EventTypeWarning && e.Source.Component == "tern-agent" {
				return true, ""
			}
		}
		return false, fmt.Sprintf("%d events", len(evs.Items))
	})
	waitFor(ctx, t, 30*time.Second, string(nodereport.ConditionIPExhausted)+"=True on "+node.Name, conditionIs(corev1.ConditionTrue))

	b, err := os.ReadFile(node.AgentLog())
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(strings.ToLower(line), "forbidden") {
			t.Errorf("agent log: %s", line)
		}
	}
}

// capabilityNumbers maps the names a Pod's securityContext uses to capability numbers.
var capabilityNumbers = map[string]int{
	"CHOWN": unix.CAP_CHOWN, "DAC_OVERRIDE": unix.CAP_DAC_OVERRIDE, "FOWNER": unix.CAP_FOWNER,
	"KILL": unix.CAP_KILL, "SETUID": unix.CAP_SETUID, "SETGID": unix.CAP_SETGID,
	"NET_BIND_SERVICE": unix.CAP_NET_BIND_SERVICE, "NET_ADMIN": unix.CAP_NET_ADMIN, "NET_RAW": unix.CAP_NET_RAW,
	"IPC_LOCK": unix.CAP_IPC_LOCK, "SYS_MODULE": unix.CAP_SYS_MODULE, "SYS_PTRACE": unix.CAP_SYS_PTRACE,
	"SYS_ADMIN": unix.CAP_SYS_ADMIN, "SYS_RESOURCE": unix.CAP_SYS_RESOURCE, "PERFMON": unix.CAP_PERFMON,
	"BPF": unix.CAP_BPF, "CHECKPOINT_RESTORE": unix.CAP_CHECKPOINT_RESTORE,
}

// WriteKubeconfig takes the ConfigMap's kubeconfig as an operator would deploy it and
// points its three cluster-specific parts at the lab: the apiserver address, and the token
// and CA files (in credDir, where the kubelet would have mounted them in the pod).
func WriteKubeconfig(credDir, manifest, server string, caPEM []byte, token string) (string, error) {
	cfg, err := clientcmd.Load([]byte(manifest))
	if err != nil {
		return "", fmt.Errorf("the ConfigMap's kubeconfig: %w", err)
	}
	cur := cfg.Contexts[cfg.CurrentContext]
	if cur == nil || cfg.Clusters[cur.Cluster] == nil || cfg.AuthInfos[cur.AuthInfo] == nil {
		return "", fmt.Errorf("the ConfigMap's kubeconfig has no complete current context %q", cfg.CurrentContext)
	}
	cluster, user := cfg.Clusters[cur.Cluster], cfg.AuthInfos[cur.AuthInfo]
	if cluster.CertificateAuthority != saCAPath || user.TokenFile != saTokenPath {
		return "", fmt.Errorf("the ConfigMap's kubeconfig reads CA %q and token %q; the pod has them at %s and %s",
			cluster.CertificateAuthority, user.TokenFile, saCAPath, saTokenPath)
	}
	tokenPath, caPath := filepath.Join(credDir, "token"), filepath.Join(credDir, "ca.crt")
	if err := os.WriteFile(tokenPath, []byte(token), 0o600); err != nil {
		return "", err
	}
	if err := os.WriteFile(caPath, caPEM, 0o600); err != nil {
		return "", err
	}
	cluster.Server, cluster.CertificateAuthority, user.TokenFile = server, caPath, tokenPath
	path := filepath.Join(credDir, "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return "", err
	}
	return path, nil
}

// waitFor polls cond until it holds, failing the test with cond's last word after timeout.
func waitFor(ctx context.Context, t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("after %s still waiting for %s (last: %s)", timeout, what, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
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
	t.Fatalf("no %s %s among the objects", kind, name)
	return zero
}

// rbacObjects are the objects that give the agent its identity and rights.
func rbacObjects(objs []deploy.Object) []deploy.Object {
	var out []deploy.Object
	for _, o := range objs {
		switch o.Raw.GetKind() {
		case "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding":
			out = append(out, o)
		}
	}
	return out
}

// capabilities is the list the DaemonSet's tern-agent container adds.
func capabilities(t *testing.T, objs []deploy.Object) []string {
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
