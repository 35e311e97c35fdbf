//go:build linux

package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tern-net/tern/test/k8s/controlplane"
	"github.com/tern-net/tern/test/k8s/kubeletsim"
	"github.com/tern-net/tern/test/k8s/nsbridge"
)

// kubeParts is the Kubernetes side of a lab (Options.Kubernetes).
type kubeParts struct {
	cp     *controlplane.ControlPlane
	client kubernetes.Interface
	// vpcBridge serves the apiserver at APIServerAddr inside the VPC router's namespace.
	vpcBridge *nsbridge.Bridge

	mu         sync.Mutex
	namespaces map[string]bool // created (or found) and given their default ServiceAccount
}

// startKubernetes runs the control plane in the root namespace and registers one Node per lab
// node. The apiserver bridges into the node namespaces are made later, by Node.prepare.
func (l *Lab) startKubernetes(ctx context.Context) error {
	binDir := l.opts.KubernetesBinDir
	if binDir == "" {
		d, err := controlplane.BinDir()
		if err != nil {
			return fmt.Errorf("lab: %w", err)
		}
		binDir = d
	}
	cp, err := controlplane.Start(ctx, controlplane.Options{
		BinDir: binDir,
		// Inside the lab directory, so Down removes it and a failed test can read its logs.
		DataDir:           l.dir + "/k8s",
		ControllerManager: true,
		Logger:            l.log.Named("controlplane"),
	})
	if err != nil {
		return fmt.Errorf("lab: start the Kubernetes control plane: %w", err)
	}
	client, err := kubernetes.NewForConfig(cp.RestConfig())
	if err != nil {
		_ = cp.Stop()
		return fmt.Errorf("lab: Kubernetes client: %w", err)
	}
	l.kube = &kubeParts{cp: cp, client: client, namespaces: map[string]bool{}}
	if err := installCRDs(ctx, cp.RestConfig()); err != nil {
		return err
	}
	for _, n := range l.nodes {
		node, err := kubeletsim.EnsureNode(ctx, client, n.Name, n.PrimaryIP)
		if err != nil {
			return fmt.Errorf("lab: register Node %s: %w", n.Name, err)
		}
		if l.RouteMode() && node.Spec.PodCIDR == "" {
			// What kube-controller-manager's node IPAM (--allocate-node-cidrs) does.
			cidr := RoutePodCIDR(n.Index).String()
			node.Spec.PodCIDR, node.Spec.PodCIDRs = cidr, []string{cidr}
			if _, err := client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
				return fmt.Errorf("lab: give Node %s the pod CIDR %s: %w", n.Name, cidr, err)
			}
		}
	}
	return nil
}

// stopKubernetes stops the control plane (apiserver, controller-manager, then etcd). Its data
// directory goes with the lab directory.
func (l *Lab) stopKubernetes() error {
	if l.kube == nil || l.kube.cp == nil {
		return nil
	}
	if l.kube.vpcBridge != nil {
		_ = l.kube.vpcBridge.Close()
		l.kube.vpcBridge = nil
	}
	err := l.kube.cp.Stop()
	l.kube.cp = nil
	if err != nil {
		return fmt.Errorf("stop the Kubernetes control plane: %w", err)
	}
	return nil
}

// Kubernetes reports whether the lab runs a control plane.
func (l *Lab) Kubernetes() bool { return l.kube != nil }

// Client is an admin client of the lab's apiserver; nil unless Options.Kubernetes.
func (l *Lab) Client() kubernetes.Interface {
	if l.kube == nil {
		return nil
	}
	return l.kube.client
}

// RestConfig is a new admin client configuration; nil unless Options.Kubernetes.
func (l *Lab) RestConfig() *rest.Config {
	if l.kube == nil || l.kube.cp == nil {
		return nil
	}
	return l.kube.cp.RestConfig()
}

// ControlPlane is the lab's control plane; nil unless Options.Kubernetes.
func (l *Lab) ControlPlane() *controlplane.ControlPlane {
	if l.kube == nil {
		return nil
	}
	return l.kube.cp
}

// KubeconfigPath is the admin kubeconfig (credentials embedded). It works unchanged in the
// root namespace and in every node namespace, where the apiserver is bridged to the same
// 127.0.0.1 port. Empty unless Options.Kubernetes.
func (l *Lab) KubeconfigPath() string {
	if l.kube == nil || l.kube.cp == nil {
		return ""
	}
	return l.kube.cp.KubeconfigPath()
}

// NodeByName finds a node by its Kubernetes name (node-1, …).
func (l *Lab) NodeByName(name string) (*Node, error) {
	for _, n := range l.nodes {
		if n.Name == name {
			return n, nil
		}
	}
	names := make([]string, len(l.nodes))
	for i, n := range l.nodes {
		names[i] = n.Name
	}
	return nil, fmt.Errorf("lab: no node %q (nodes: %v)", name, names)
}

// Pod returns the live pod namespace/name, or nil.
func (l *Lab) Pod(namespace, name string) *Pod {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.pods[namespace+"/"+name]
}

// PodSpec is a pod for RunPod.
type PodSpec struct {
	Namespace string // default "default"; created if missing
	Name      string
	Node      string // node name (node-1, …)
	Labels    map[string]string
	// Ports are the container's declared ports (named target ports resolve against them).
	// ServePort and HTTPPort are added when missing, named "serve" and "http".
	Ports []corev1.ContainerPort
	// ServePort, when set, starts Pod.Serve on it: greets with namespace/name, then echoes
	// lines (Pod.Ask speaks it).
	ServePort int
	// HTTPPort, when set, starts Pod.ServeHTTP on it: "hello from <name> on <node> (<ip>)".
	HTTPPort int
	// NotReady reports the pod running but not Ready (it gets an address, no endpoint).
	NotReady bool
	// Annotations and OwnerReferences go on the Pod object (k8s.aliyun.com/eni asks for an
	// exclusive ENI; a StatefulSet pod carries its template's annotations and its controller).
	Annotations     map[string]string
	OwnerReferences []metav1.OwnerReference
}

// RunPod does a kubelet's part for one pod: it creates the Pod object bound to its node,
// calls CNI ADD through libcni with the object's UID in K8S_POD_UID (retrying "try again
// later" as AddPod does), starts the pod's servers, and reports the pod running with its
// address and Ready through the status subresource, from which the controller-manager
// derives EndpointSlices. On error nothing of the pod is left.
func (l *Lab) RunPod(ctx context.Context, s PodSpec) (_ *Pod, err error) {
	if l.kube == nil {
		return nil, errors.New("lab: RunPod needs a Kubernetes lab (Options.Kubernetes); use AddPod for CNI-only pods")
	}
	if s.Namespace == "" {
		s.Namespace = "default"
	}
	n, err := l.NodeByName(s.Node)
	if err != nil {
		return nil, err
	}
	if l.Pod(s.Namespace, s.Name) != nil {
		return nil, fmt.Errorf("lab: pod %s/%s already runs", s.Namespace, s.Name)
	}
	if err := l.EnsureNamespace(ctx, s.Namespace); err != nil {
		return nil, err
	}
	ports := append([]corev1.ContainerPort(nil), s.Ports...)
	ports = addPort(ports, "serve", s.ServePort)
	ports = addPort(ports, "http", s.HTTPPort)
	obj, err := kubeletsim.CreatePod(ctx, l.kube.client, kubeletsim.PodSpec{Namespace: s.Namespace, Name: s.Name,
		Node: n.Name, Labels: s.Labels, Ports: ports, Annotations: s.Annotations, OwnerReferences: s.OwnerReferences})
	if err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	p, err := l.addPod(ctx, n, s.Namespace, s.Name, string(obj.UID))
	if err != nil {
		// The object must not outlive a pod that never got its network.
		_ = kubeletsim.DeletePod(context.WithoutCancel(ctx), l.kube.client, s.Namespace, s.Name)
		return nil, err
	}
	p.kube = true
	defer func() {
		if err != nil {
			_ = l.DeletePod(context.WithoutCancel(ctx), p)
		}
	}()
	if s.ServePort != 0 {
		if _, err := p.Serve(s.ServePort); err != nil {
			return nil, err
		}
	}
	if s.HTTPPort != 0 {
		if _, err := p.ServeHTTP(s.HTTPPort); err != nil {
			return nil, err
		}
	}
	if _, err := kubeletsim.SetRunning(ctx, l.kube.client, obj, p.IP.String(), !s.NotReady); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	l.log.Info("pod running", zap.String("pod", p.Key()), zap.String("node", n.Name), zap.Stringer("ip", p.IP),
		zap.String("uid", p.UID))
	return p, nil
}

func addPort(ports []corev1.ContainerPort, name string, port int) []corev1.ContainerPort {
	if port == 0 {
		return ports
	}
	for _, p := range ports {
		if int(p.ContainerPort) == port && (p.Protocol == "" || p.Protocol == corev1.ProtocolTCP) {
			return ports
		}
	}
	return append(ports, corev1.ContainerPort{Name: name, ContainerPort: int32(port), Protocol: corev1.ProtocolTCP})
}

// SetPodReady reports a RunPod pod Ready or not Ready (still running, same address), as a
// kubelet does when a readiness probe changes its mind.
func (l *Lab) SetPodReady(ctx context.Context, p *Pod, ready bool) error {
	if l.kube == nil || !p.kube {
		return fmt.Errorf("lab: pod %s was not started by RunPod", p.Key())
	}
	ref := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: p.Namespace, Name: p.Name}}
	if _, err := kubeletsim.SetRunning(ctx, l.kube.client, ref, p.IP.String(), ready); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	return nil
}

// EnsureNamespace creates a namespace if it does not exist and waits for its "default"
// ServiceAccount: the ServiceAccount admission plugin refuses pods until the
// controller-manager has made it.
func (l *Lab) EnsureNamespace(ctx context.Context, name string) error {
	if l.kube == nil {
		return errors.New("lab: EnsureNamespace needs a Kubernetes lab (Options.Kubernetes)")
	}
	k := l.kube
	k.mu.Lock()
	done := k.namespaces[name]
	k.mu.Unlock()
	if done {
		return nil
	}
	_, err := k.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("lab: create namespace %s: %w", name, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		_, err := k.client.CoreV1().ServiceAccounts(name).Get(ctx, "default", metav1.GetOptions{})
		if err == nil {
			break
		}
		if !apierrors.IsNotFound(err) {
			return fmt.Errorf("lab: get the default ServiceAccount of %s: %w", name, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("lab: namespace %s has no default ServiceAccount after 30s (is kube-controller-manager running? see %s): %w",
				name, k.cp.DataDir(), ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	k.mu.Lock()
	k.namespaces[name] = true
	k.mu.Unlock()
	return nil
}

// ServeHTTP serves HTTP on port inside the pod: every request is answered with
// "hello from <name> on <node> (<ip>), client <address>", so a client can tell which backend
// and which node answered and what source address (after any SNAT) reached the backend. The
// server stops when the pod is deleted or with the returned closer.
func (p *Pod) ServeHTTP(port int) (io.Closer, error) {
	var ln net.Listener
	err := p.Exec(func() error {
		var err error
		ln, err = net.Listen("tcp4", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on port %d in pod %s: %w", port, p.Key(), err)
	}
	hello := fmt.Sprintf("hello from %s on %s (%s), client ", p.Name, p.Node.Name, p.IP)
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			client, _, _ := net.SplitHostPort(r.RemoteAddr)
			_, _ = fmt.Fprint(w, hello+client+"\n")
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go func() { _ = srv.Serve(ln) }()
	p.track(srv)
	return srv, nil
}

// HTTPGet fetches url from inside the pod on a new connection (no keep-alive, so every
// request through a ClusterIP is a new flow and a new backend choice) and returns the body.
func (p *Pod) HTTPGet(ctx context.Context, url string) (string, error) {
	return p.HTTPGetFrom(ctx, url, 0)
}

// HTTPGetFrom is HTTPGet from a given source port (0: any; see DialFrom).
func (p *Pod) HTTPGetFrom(ctx context.Context, url string, localPort int) (string, error) {
	tr := &http.Transport{
		Proxy: nil, // the lab's addresses are never behind a proxy
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return p.DialFrom(ctx, addr, localPort)
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", fmt.Errorf("GET %s from pod %s: %w", url, p.Key(), err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return "", fmt.Errorf("GET %s from pod %s: read body: %w", url, p.Key(), err)
	}
	body := strings.TrimRight(string(b), "\r\n")
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s from pod %s: HTTP %d: %s", url, p.Key(), resp.StatusCode, body)
	}
	return body, nil
}
