package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/test/lab"
)

// The lab has four nodes, one role each, so that every datapath runs in the same lab, at
// the same time, against the same five backends:
//
//	node-1  tern's agent with the Kubernetes side on (it load-balances Services)
//	node-2  the real kube-proxy, iptables mode (tern's agent there does IPAM and pod
//	        networking only, forwarding through the kernel stack so netfilter sees it)
//	node-3  the real kube-proxy, nftables mode (same)
//	node-4  the five backend pods; no proxy
//
// A client pod on each of nodes 1–3 reaches the Service through its node's proxy; the
// no-Service baseline is the node-1 client dialling the backends' pod IPs itself. The
// lab's external client reaches each of nodes 1–3 on the NodePort, and the backends' pod
// IPs directly for its baseline.
const (
	nodeTern = iota
	nodeIPTables
	nodeNFTables
	nodeServers
	nodeCount
)

const (
	benchNS    = "bench"
	fillNS     = "bench-fill"
	echoPort   = 7000 // lab.Pod.Serve: greeting, then line echo
	sinkPort   = 7001 // discards what it reads
	svcEcho    = 80
	svcSink    = 81
	npEcho     = 30080
	npSink     = 30081
	backends   = 5
	backendApp = "bench-echo"
	// fillManagedBy marks the filler Services' slices as the benchmark's own.
	fillManagedBy = "kubeproxy-bench.tern.invalid"
)

// datapath is one way for a client to reach the backends.
type datapath struct {
	key  string // none, tern, iptables, nftables, routed
	name string
	node int // the client's node (none: node-1's client)
	// nodePortOnly: a baseline that only the NodePort path has.
	nodePortOnly bool
}

// routedClientIP is the second external client's address (TEST-NET-3): the VPC router sends
// its traffic through node-1 (lab.RouteExternalThrough).
const routedClientIP = "203.0.113.10"

var datapaths = []datapath{
	{key: "none", name: "no Service", node: nodeTern},
	{key: "tern", name: "tern", node: nodeTern},
	{key: "iptables", name: "kube-proxy iptables", node: nodeIPTables},
	{key: "nftables", name: "kube-proxy nftables", node: nodeNFTables},
	// The external client dialling the pod IPs, its packets routed through node-1 and back
	// out to node-4 (replies too) with no Service: the hops of a NodePort flow to a remote
	// backend without the translation. A NodePort datapath's ratio to it is the cost of the
	// datapath; its ratio to "none" adds the detour through the node.
	{key: "routed", name: "no Service, through node-1", node: nodeTern, nodePortOnly: true},
}

// bench is a running lab with the benchmark's pods and Services.
type bench struct {
	p       params
	binDir  string // tern-agent and tern-cni the lab starts (memonly.go replaces node-1's)
	l       *lab.Lab
	client  kubernetes.Interface
	kps     map[string]*lab.KubeProxy
	clients [nodeCount]*lab.Pod // client pods on nodes 1–3
	direct  *lab.Pod            // node-1's no-Service client
	servers []*lab.Pod
	sinks   []net.Listener
	ext     *lab.External
	routed  *lab.ExternalHost // the external client whose traffic crosses node-1
	vip     netip.Addr        // the measured Service's cluster IP
	// Services in the cluster: the measured one, fillers and sentinels.
	fillers, sentinels int
	etcd               *etcdFiller // -fill etcd, from the first fill on
	logf               func(format string, args ...any)
}

func setup(ctx context.Context, p params, binDir string, logf func(string, ...any)) (_ *bench, err error) {
	b := &bench{p: p, kps: map[string]*lab.KubeProxy{}, logf: logf, binDir: binDir}
	defer func() {
		if err != nil {
			b.Close()
		}
	}()
	var kubeconfig string
	opts := lab.Options{
		Nodes:         nodeCount,
		BinDir:        binDir,
		Kubernetes:    true,
		ExternalProxy: true, // every agent leaves Services alone, but node-1's (below)
		// Called once per node when the control plane is up, before the configs are
		// written: it only records the admin kubeconfig for node-1's agent.
		AgentKubeconfig: func(_ context.Context, l *lab.Lab, _ *lab.Node) (string, error) {
			kubeconfig = l.KubeconfigPath()
			return kubeconfig, nil
		},
		AgentConfig: func(n *lab.Node, c *agent.Config) {
			if n.Index == nodeTern {
				c.Kubeconfig, c.Forwarding = kubeconfig, ""
				c.PprofAddr = labPprof(p.heapDir)
			}
		},
	}
	if b.l, err = lab.Up(ctx, opts); err != nil {
		return nil, err
	}
	rc := b.l.RestConfig()
	rc.QPS, rc.Burst = 5000, 10000
	if b.client, err = kubernetes.NewForConfig(rc); err != nil {
		return nil, err
	}
	for _, ns := range []string{benchNS, fillNS} {
		if err := b.l.EnsureNamespace(ctx, ns); err != nil {
			return nil, err
		}
	}
	for i := range backends {
		pod, err := b.l.RunPod(ctx, lab.PodSpec{Namespace: benchNS, Name: fmt.Sprintf("backend-%d", i), Node: b.l.Node(nodeServers).Name,
			Labels: map[string]string{"app": backendApp}, ServePort: echoPort,
			Ports: []corev1.ContainerPort{{Name: "sink", ContainerPort: sinkPort, Protocol: corev1.ProtocolTCP}}})
		if err != nil {
			return nil, err
		}
		b.servers = append(b.servers, pod)
		var ln net.Listener
		if err := pod.Exec(func() (err error) { ln, err = net.Listen("tcp4", ":"+strconv.Itoa(sinkPort)); return err }); err != nil {
			return nil, fmt.Errorf("sink in %s: %w", pod.Key(), err)
		}
		b.sinks = append(b.sinks, ln)
		go sink(ln)
	}
	for _, n := range []int{nodeTern, nodeIPTables, nodeNFTables} {
		// Pods with objects (RunPod), not bare CNI pods: tern's agent frees the address of
		// a pod the apiserver does not know.
		if b.clients[n], err = b.l.RunPod(ctx, lab.PodSpec{Namespace: benchNS, Name: fmt.Sprintf("client-%d", n+1), Node: b.l.Node(n).Name}); err != nil {
			return nil, err
		}
	}
	// The no-Service client is a pod of its own on node-1: a client that mixes direct and
	// Service connections to the same backends from one address hits the conntrack
	// collision reported in docs/benchmarks.md (a reused source port's reply is taken for
	// the earlier Service flow's), which would measure that bug instead of the path.
	if b.direct, err = b.l.RunPod(ctx, lab.PodSpec{Namespace: benchNS, Name: "client-direct", Node: b.l.Node(nodeTern).Name}); err != nil {
		return nil, err
	}
	if b.ext, err = b.l.ExternalClient(); err != nil {
		return nil, err
	}
	if b.routed, err = b.l.AddExternalHost(netip.MustParseAddr(routedClientIP)); err != nil {
		return nil, err
	}
	if err := b.l.RouteExternalThrough(b.routed, b.l.Node(nodeTern)); err != nil {
		return nil, err
	}
	svc, err := b.client.CoreV1().Services(benchNS).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, Selector: map[string]string{"app": backendApp},
			Ports: []corev1.ServicePort{
				{Name: "echo", Port: svcEcho, TargetPort: intstr.FromInt32(echoPort), NodePort: npEcho, Protocol: corev1.ProtocolTCP},
				{Name: "sink", Port: svcSink, TargetPort: intstr.FromInt32(sinkPort), NodePort: npSink, Protocol: corev1.ProtocolTCP},
			}},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create the measured Service: %w", err)
	}
	if b.vip, err = netip.ParseAddr(svc.Spec.ClusterIP); err != nil {
		return nil, fmt.Errorf("the measured Service's cluster IP %q: %w", svc.Spec.ClusterIP, err)
	}
	for _, mode := range []string{"iptables", "nftables"} {
		n := b.l.Node(map[string]int{"iptables": nodeIPTables, "nftables": nodeNFTables}[mode])
		if b.kps[mode], err = b.l.StartKubeProxy(ctx, n, mode); err != nil {
			return nil, err
		}
	}
	// The measured Service's slice comes from the controller-manager, after the pods are
	// Ready: wait until every proxy serves it, on the cluster IP and on the NodePort.
	if err := b.waitServed(ctx, netip.AddrPortFrom(b.vip, svcEcho).String(), 2*time.Minute); err != nil {
		return nil, err
	}
	for _, n := range []int{nodeTern, nodeIPTables, nodeNFTables} {
		addr := net.JoinHostPort(b.l.Node(n).PrimaryIP, strconv.Itoa(npEcho))
		if err := pollEcho(ctx, b.ext.NS(), addr, 2*time.Minute); err != nil {
			return nil, fmt.Errorf("NodePort %s from the external client: %w", addr, err)
		}
	}
	for _, s := range b.servers {
		addr := net.JoinHostPort(s.IP.String(), strconv.Itoa(echoPort))
		if err := pollEcho(ctx, b.routed.NS, addr, time.Minute); err != nil {
			return nil, fmt.Errorf("%s through node-1 from %s: %w", addr, routedClientIP, err)
		}
	}
	return b, nil
}

// pollEcho polls addr from namespace ns (connect, greeting, echo) until it answers.
func pollEcho(ctx context.Context, ns netns.NsHandle, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 256)
	for {
		var err error
		if ierr := inNS(ns, 1, func(int) { err = oneExchange(addr, buf) }); ierr != nil {
			return ierr
		}
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s still fails after %s: %w", addr, timeout, err)
		}
		time.Sleep(200 * time.Millisecond) // a poll interval, not a synchronisation
	}
}

// Close stops the kube-proxies and takes the lab down.
func (b *bench) Close() error {
	var errs []error
	for _, ln := range b.sinks {
		ln.Close()
	}
	for _, kp := range b.kps {
		if err := kp.Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	if b.l != nil {
		errs = append(errs, b.l.Down())
	}
	return errors.Join(errs...)
}

// grow brings the cluster to total Services: filler Services without selectors, each with
// one EndpointSlice of five addresses nothing answers on (written directly, as an
// EndpointSlice controller would), then one sentinel Service that selects the real
// backends. Once every proxy serves the sentinel, it has processed every earlier Service
// too (each proxy applies changes in order), so the measurement starts on a converged
// datapath. It returns the time the API writes took and the time until every proxy served
// the sentinel.
func (b *bench) grow(ctx context.Context, total int) (writes, converge time.Duration, err error) {
	if total <= 1+b.fillers+b.sentinels {
		return 0, 0, nil // the measured Service alone (or already there)
	}
	start := time.Now()
	want := total - 1 - b.sentinels - 1
	if b.p.fill == fillEtcd {
		if err := b.fillEtcd(ctx, b.fillers, want); err != nil {
			return 0, 0, fmt.Errorf("write fillers %d–%d into etcd: %w", b.fillers, want, err)
		}
	} else if err := parallel(ctx, b.p.workers, b.fillers, want, b.createFiller); err != nil {
		return 0, 0, err
	}
	b.fillers = want
	name := fmt.Sprintf("sentinel-%d", b.sentinels)
	svc, err := b.client.CoreV1().Services(benchNS).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": backendApp},
			Ports: []corev1.ServicePort{{Name: "echo", Port: svcEcho, TargetPort: intstr.FromInt32(echoPort), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		return 0, 0, fmt.Errorf("create %s: %w", name, err)
	}
	b.sentinels++
	writes = time.Since(start)
	addr := net.JoinHostPort(svc.Spec.ClusterIP, strconv.Itoa(svcEcho))
	if err := b.waitServed(ctx, addr, b.p.convergeTimeout); err != nil {
		return writes, 0, fmt.Errorf("after %d Services: %w", total, err)
	}
	return writes, time.Since(start), nil
}

// waitServed polls addr from every proxy's client until each gets an echo.
func (b *bench) waitServed(ctx context.Context, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, n := range []int{nodeTern, nodeIPTables, nodeNFTables} {
		c := b.clients[n]
		if err := pollEcho(ctx, c.NS(), addr, time.Until(deadline)); err != nil {
			return fmt.Errorf("from %s (%s's proxy): %w", c.Key(), b.l.Node(n).Name, err)
		}
	}
	return nil
}

func fillerEndpoint(i, j int) string {
	n := uint32(i*backends + j + 1)
	return netip.AddrFrom4([4]byte{172, byte(16 + n>>16), byte(n >> 8), byte(n)}).String()
}

func (b *bench) createFiller(ctx context.Context, i int) error {
	name := fmt.Sprintf("fill-%05d", i)
	if _, err := b.client.CoreV1().Services(fillNS).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{
			Name: "http", Port: svcEcho, TargetPort: intstr.FromInt32(echoPort), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create Service %s: %w", name, err)
	}
	eps := make([]discoveryv1.Endpoint, backends)
	for j := range eps {
		eps[j] = discoveryv1.Endpoint{Addresses: []string{fillerEndpoint(i, j)},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)}}
	}
	if _, err := b.client.DiscoveryV1().EndpointSlices(fillNS).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
			discoveryv1.LabelServiceName: name, discoveryv1.LabelManagedBy: fillManagedBy}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   eps,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](echoPort), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create EndpointSlice %s: %w", name, err)
	}
	return nil
}

// parallel calls fn for every index in [from, to) from `workers` goroutines and stops at
// the first error.
func parallel(ctx context.Context, workers, from, to int, fn func(context.Context, int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	next := make(chan int)
	var (
		wg       sync.WaitGroup
		once     sync.Once
		firstErr error
	)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := fn(ctx, i); err != nil {
					once.Do(func() { firstErr = err; cancel() })
				}
			}
		}()
	}
feed:
	for i := from; i < to; i++ {
		select {
		case next <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}
