package controlplane_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/test/k8s/controlplane"
	"github.com/tern-net/tern/test/k8s/nsbridge"
)

// startControlPlane starts a full control plane for one test, or skips (fails in CI) when
// the binaries have not been built.
func startControlPlane(t *testing.T, o controlplane.Options) *controlplane.ControlPlane {
	t.Helper()
	binDir, err := controlplane.BinDir()
	if err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	o.BinDir = binDir
	if o.DataDir == "" {
		o.DataDir = t.TempDir()
	}
	if o.Logger == nil {
		o.Logger = zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	began := time.Now()
	cp, err := controlplane.Start(ctx, o)
	if err != nil {
		t.Fatalf("start control plane: %v", err)
	}
	t.Logf("control plane (controller-manager=%v) ready in %s at %s", o.ControllerManager, time.Since(began).Round(time.Millisecond), cp.APIServerURL())
	t.Cleanup(func() {
		if err := cp.Stop(); err != nil {
			t.Errorf("stop control plane: %v", err)
		}
	})
	return cp
}

func TestEndpointSliceFromPodsReportedReady(t *testing.T) {
	cp := startControlPlane(t, controlplane.Options{ControllerManager: true})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cs := kubernetes.NewForConfigOrDie(cp.RestConfig())

	// The kubeconfig file works on its own, as agents and kubectl would load it.
	kc, err := clientcmd.BuildConfigFromFlags("", cp.KubeconfigPath())
	if err != nil {
		t.Fatalf("load kubeconfig %s: %v", cp.KubeconfigPath(), err)
	}
	ver, err := kubernetes.NewForConfigOrDie(kc).Discovery().ServerVersion()
	if err != nil {
		t.Fatalf("server version through the kubeconfig: %v", err)
	}
	if ver.GitVersion != controlplane.KubernetesVersion {
		t.Errorf("apiserver reports %s, want %s", ver.GitVersion, controlplane.KubernetesVersion)
	}

	const ns = "web"
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// A Node as a kubelet registers it: object, then addresses through status.
	node, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name:   "node-a",
		Labels: map[string]string{"topology.kubernetes.io/zone": "cn-hangzhou-k"},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: "192.168.0.10"},
		{Type: corev1.NodeHostName, Address: "node-a"},
	}
	node.Status.Conditions = []corev1.NodeCondition{{
		Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
		LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now(),
	}}
	if _, err := cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("update node status: %v", err)
	}

	svc, err := cs.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "frontend"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "frontend"},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ip := net.ParseIP(svc.Spec.ClusterIP); ip == nil || !strings.HasPrefix(svc.Spec.ClusterIP, "10.96.") {
		t.Errorf("ClusterIP %q not allocated from the default service CIDR %s", svc.Spec.ClusterIP, controlplane.DefaultServiceCIDR)
	}

	// Two ready pods and one that is running but not ready; the slice must tell them apart.
	pods := []struct {
		name, ip string
		ready    bool
	}{
		{"frontend-1", "192.168.1.11", true},
		{"frontend-2", "192.168.1.12", true},
		{"frontend-3", "192.168.1.13", false},
	}
	for _, p := range pods {
		pod, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: p.name, Labels: map[string]string{"app": "frontend"}},
			Spec: corev1.PodSpec{
				NodeName: "node-a", // no scheduler: bind directly
				Containers: []corev1.Container{{
					Name: "web", Image: "registry.example/web:1",
					Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
				}},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("create pod %s: %v", p.name, err)
		}
		readyStatus := corev1.ConditionFalse
		if p.ready {
			readyStatus = corev1.ConditionTrue
		}
		now := metav1.Now()
		pod.Status = corev1.PodStatus{
			Phase:     corev1.PodRunning,
			HostIP:    "192.168.0.10",
			HostIPs:   []corev1.HostIP{{IP: "192.168.0.10"}},
			PodIP:     p.ip,
			PodIPs:    []corev1.PodIP{{IP: p.ip}},
			StartTime: &now,
			Conditions: []corev1.PodCondition{
				{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
				{Type: corev1.PodInitialized, Status: corev1.ConditionTrue, LastTransitionTime: now},
				{Type: corev1.ContainersReady, Status: readyStatus, LastTransitionTime: now},
				{Type: corev1.PodReady, Status: readyStatus, LastTransitionTime: now},
			},
		}
		if _, err := cs.CoreV1().Pods(ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
			t.Fatalf("report status of pod %s: %v", p.name, err)
		}
	}

	// The controller-manager, not this test, writes the slice.
	type endpoint struct {
		ip, node string
		ready    bool
	}
	want := []endpoint{{"192.168.1.11", "node-a", true}, {"192.168.1.12", "node-a", true}, {"192.168.1.13", "node-a", false}}
	var got []endpoint
	var slice discoveryv1.EndpointSlice
	err = wait.PollUntilContextCancel(ctx, 100*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		list, err := cs.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=frontend"})
		if err != nil {
			return false, err
		}
		got = nil
		for _, s := range list.Items {
			slice = s
			for _, e := range s.Endpoints {
				ep := endpoint{ip: strings.Join(e.Addresses, ","), ready: e.Conditions.Ready != nil && *e.Conditions.Ready}
				if e.NodeName != nil {
					ep.node = *e.NodeName
				}
				got = append(got, ep)
			}
		}
		slices.SortFunc(got, func(a, b endpoint) int { return strings.Compare(a.ip, b.ip) })
		return slices.Equal(got, want), nil
	})
	if err != nil {
		t.Fatalf("EndpointSlice for %s/frontend: got endpoints %+v, want %+v: %v (controller-manager log: %s/kube-controller-manager.log)", ns, got, want, err, cp.DataDir())
	}
	if slice.Labels[discoveryv1.LabelManagedBy] != "endpointslice-controller.k8s.io" {
		t.Errorf("slice managed by %q, want the endpointslice controller", slice.Labels[discoveryv1.LabelManagedBy])
	}
	if len(slice.Ports) != 1 || slice.Ports[0].Port == nil || *slice.Ports[0].Port != 8080 {
		t.Errorf("slice ports %+v, want the resolved targetPort 8080", slice.Ports)
	}
	for _, e := range slice.Endpoints {
		if e.Zone == nil || *e.Zone != "cn-hangzhou-k" {
			t.Errorf("endpoint %v zone %v, want the node's zone label cn-hangzhou-k", e.Addresses, e.Zone)
		}
	}

	// Controllers act under their own service accounts (--use-service-account-credentials):
	// the namespace got its default ServiceAccount from the serviceaccount controller.
	if err := wait.PollUntilContextCancel(ctx, 100*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		_, err := cs.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		return err == nil, err
	}); err != nil {
		t.Errorf("default ServiceAccount in %s never appeared: %v", ns, err)
	}
}

func TestInformerResumesAfterAPIServerRestart(t *testing.T) {
	cp := startControlPlane(t, controlplane.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cs := kubernetes.NewForConfigOrDie(cp.RestConfig())

	mkService := func(name string) {
		t.Helper()
		_, err := cs.CoreV1().Services("default").Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("create service %s: %v", name, err)
		}
	}
	mkService("before")

	added := make(chan string, 16)
	factory := informers.NewSharedInformerFactoryWithOptions(cs, 0, informers.WithNamespace("default"))
	inf := factory.Core().V1().Services().Informer()
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { added <- obj.(*corev1.Service).Name },
	}); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	defer factory.Shutdown() // runs after close(stop): Shutdown waits for the informers to end
	defer close(stop)
	factory.Start(stop)
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		t.Fatal("service informer never synced")
	}
	waitAdd := func(name string) {
		t.Helper()
		for {
			select {
			case n := <-added:
				if n == name {
					return
				}
			case <-ctx.Done():
				t.Fatalf("informer never delivered service %q", name)
			}
		}
	}
	waitAdd("before")

	began := time.Now()
	if err := cp.RestartAPIServer(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("apiserver restarted in %s", time.Since(began).Round(time.Millisecond))

	// Written after the restart: only a resumed watch (or relist) can deliver it.
	created := time.Now()
	mkService("after")
	waitAdd("after")
	t.Logf("informer delivered the post-restart object %s after its create", time.Since(created).Round(time.Millisecond))
	if _, ok, _ := inf.GetStore().GetByKey("default/before"); !ok {
		t.Error("pre-restart service vanished from the informer store")
	}
}

// TestAPIServerFromNodeNamespace reaches the apiserver from inside a network namespace
// through nsbridge with the unchanged admin kubeconfig, as node agents in the lab do.
func TestAPIServerFromNodeNamespace(t *testing.T) {
	testutil.RequirePrivileged(t)
	cp := startControlPlane(t, controlplane.Options{})
	node := testutil.NewNetNS(t)
	b, err := nsbridge.Start(nsbridge.Config{NS: node, Target: strings.TrimPrefix(cp.APIServerURL(), "https://")})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()

	cfg, err := clientcmd.BuildConfigFromFlags("", cp.KubeconfigPath())
	if err != nil {
		t.Fatal(err)
	}
	// Every connection client-go opens is dialled from inside the node namespace.
	cfg.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := nsutil.Do(node, func() error {
			var d net.Dialer
			var err error
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
	cs := kubernetes.NewForConfigOrDie(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := cs.CoreV1().ConfigMaps("default").Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "from-node"},
		Data:       map[string]string{"ns": fmt.Sprint(node)},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create through the bridge: %v", err)
	}
	// Read back from the root namespace: the write really reached the shared apiserver.
	root := kubernetes.NewForConfigOrDie(cp.RestConfig())
	if _, err := root.CoreV1().ConfigMaps("default").Get(ctx, "from-node", metav1.GetOptions{}); err != nil {
		t.Fatalf("object written from the node namespace not visible from the root namespace: %v", err)
	}

	// Without the bridge the same kubeconfig fails inside the namespace.
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	cfg.Timeout = 3 * time.Second
	if _, err := kubernetes.NewForConfigOrDie(cfg).CoreV1().ConfigMaps("default").Get(ctx, "from-node", metav1.GetOptions{}); err == nil {
		t.Fatal("apiserver reachable from the node namespace after the bridge closed; the dialer is not in the namespace")
	}
}

func TestStopKillsProcessesAndRemovesOwnDataDir(t *testing.T) {
	binDir, err := controlplane.BinDir()
	if err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{BinDir: binDir, ServiceCIDR: "10.100.0.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	dir := cp.DataDir()
	url := strings.TrimPrefix(cp.APIServerURL(), "https://")
	svc, err := kubernetes.NewForConfigOrDie(cp.RestConfig()).CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if svc.Spec.ClusterIP != "10.100.0.1" {
		t.Errorf("kubernetes Service ClusterIP %s, want the first address of ServiceCIDR 10.100.0.0/24", svc.Spec.ClusterIP)
	}
	if err := cp.Stop(); err != nil {
		t.Fatal(err)
	}
	if c, err := net.DialTimeout("tcp", url, time.Second); err == nil {
		c.Close()
		t.Errorf("apiserver port %s still accepts connections after Stop", url)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("data dir %s Start created still exists after Stop (stat: %v)", dir, err)
	}
	if err := cp.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

func TestBinDirNamesTheBuildScript(t *testing.T) {
	t.Setenv("TERN_K8S_BIN_DIR", t.TempDir())
	_, err := controlplane.BinDir()
	if err == nil || !strings.Contains(err.Error(), "test/k8s/build.sh") {
		t.Fatalf("BinDir on an empty directory: got %v, want an error naming test/k8s/build.sh", err)
	}
}
