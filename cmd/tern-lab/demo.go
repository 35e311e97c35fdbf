//go:build linux

package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/ternctl"
	"github.com/tern-net/tern/test/lab"
)

const (
	demoNS      = "demo"
	demoService = "web"
	webPort     = 8080
	servicePort = 80
)

// demo is the guided walk-through `make demo` runs against a lab that is up.
type demo struct {
	c        *client
	kube     kubernetes.Interface
	st       *Status
	requests int
	step     int
	vip      string
	// nodePortAddr is a node's address and the api Service's node port, for the tips.
	nodePortAddr string
	hostStep     int // the host-network step's number
	apiNodePort  int // the api Service's node port
}

func cmdDemo(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	dir := fs.String("dir", defaultDir, "lab directory")
	requests := fs.Int("requests", 30, "requests per round from the client pod")
	if err := fs.Parse(args); err != nil {
		return err
	}
	d := &demo{c: newClient(*dir, 3*time.Minute), requests: *requests}
	var err error
	if d.st, err = d.c.status(ctx); err != nil {
		return err
	}
	rc, err := clientcmd.BuildConfigFromFlags("", d.st.Kubeconfig)
	if err != nil {
		return fmt.Errorf("read the lab's kubeconfig %s: %w", d.st.Kubeconfig, err)
	}
	if d.kube, err = kubernetes.NewForConfig(rc); err != nil {
		return err
	}
	if len(d.st.Nodes) < 2 {
		return fmt.Errorf("the demo needs 2 nodes; the lab has %d (tern-lab down, then up -nodes 2)", len(d.st.Nodes))
	}
	began := time.Now()
	if err := d.reset(ctx); err != nil {
		return err
	}
	for _, s := range []func(context.Context) error{d.nodes, d.namespace, d.backends, d.service, d.client, d.scaleUp,
		d.scaleDown, d.hostNetwork, d.nodePort, d.dumps} {
		if err := s(ctx); err != nil {
			return err
		}
	}
	d.explore(time.Since(began))
	return nil
}

func (d *demo) title(s string) {
	d.step++
	fmt.Printf("\n\033[1m== %d. %s\033[0m\n\n", d.step, s)
}

func say(format string, a ...any) { fmt.Printf(format+"\n", a...) }

// reset removes what an earlier run of the demo made, so that `tern-lab demo` can be rerun.
func (d *demo) reset(ctx context.Context) error {
	for _, p := range d.st.Pods {
		if p.Namespace == demoNS {
			if err := d.c.do(ctx, "DELETE", "/v1/pods/"+p.Namespace+"/"+p.Name, nil, nil); err != nil {
				return fmt.Errorf("remove pod %s from an earlier demo: %w", p.Name, err)
			}
		}
	}
	for _, name := range []string{demoService, nodePortService} {
		err := d.kube.CoreV1().Services(demoNS).Delete(ctx, name, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("remove the Service %s of an earlier demo: %w", name, err)
		}
	}
	return nil
}

func (d *demo) nodes(ctx context.Context) error {
	d.title("The cluster: two nodes, each an ECS instance running tern-agent")
	nodes, err := d.kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	byName := map[string]NodeInfo{}
	for _, n := range d.st.Nodes {
		byName[n.Name] = n
	}
	w := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(w, "  NODE\tINTERNAL IP\tECS INSTANCE\tTERN-AGENT PID\tMAX PODS (annotation by tern)")
	for _, n := range nodes.Items {
		ip := ""
		for _, a := range n.Status.Addresses {
			if a.Type == corev1.NodeInternalIP {
				ip = a.Address
			}
		}
		fmt.Fprintf(w, "  %s\t%s\t%s\t%d\t%s\n", n.Name, ip, byName[n.Name].InstanceID, byName[n.Name].AgentPID,
			n.Annotations["k8s.aliyun.com/max-available-ip"])
	}
	w.Flush()
	say("\nEach node is a network namespace plugged into an emulated VPC (192.168.0.0/16) through its")
	say("primary ENI. The Nodes are registered in a real kube-apiserver (%s);", d.st.APIServer)
	say("each agent watches it for Services and EndpointSlices and writes its node's eBPF maps.")
	return nil
}

func (d *demo) namespace(ctx context.Context) error {
	d.title("A namespace for the demo")
	_, err := d.kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: demoNS}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %s: %w", demoNS, err)
	}
	say("  namespace/%s created", demoNS)
	return nil
}

// webPod runs web-i on node.
func (d *demo) webPod(ctx context.Context, i int, node string) (PodInfo, error) {
	var p PodInfo
	err := d.c.do(ctx, "POST", "/v1/pods", PodRequest{Namespace: demoNS, Name: fmt.Sprintf("web-%d", i), Node: node,
		Labels: map[string]string{"app": "web"}, HTTPPort: webPort}, &p)
	return p, err
}

// node returns the name of node i modulo the node count.
func (d *demo) node(i int) string { return d.st.Nodes[i%len(d.st.Nodes)].Name }

func (d *demo) backends(ctx context.Context) error {
	d.title("Three web replicas, spread over both nodes")
	say("tern-lab plays the kubelet: it creates each Pod bound to its node, calls tern-cni through")
	say("libcni (as containerd would) with the Pod's UID, starts a small HTTP server in the pod that")
	say("answers \"hello from <pod> on <node> (<ip>), client <source>\", and reports the pod's IP and Ready to the apiserver.\n")
	var pods []PodInfo
	for i := range 3 {
		p, err := d.webPod(ctx, i, d.node(i))
		if err != nil {
			return err
		}
		pods = append(pods, p)
	}
	if err := d.podTable(ctx, pods); err != nil {
		return err
	}
	say("\nThe pod IPs are VPC addresses: secondary private IPs of ENIs that each agent created and")
	say("attached to its own instance through the ECS API (vSwitch vsw-lab-pods, 192.168.16.0/20).")
	say("No overlay, no NAT: the VPC routes them to the right node.")
	return nil
}

// podTable prints pods with the ENI each address belongs to, from the agents' IPAM state.
func (d *demo) podTable(ctx context.Context, pods []PodInfo) error {
	eniOf := map[string]string{}
	for _, n := range d.st.Nodes {
		st, err := api.NewClient(n.Socket, 10*time.Second).State(ctx)
		if err != nil {
			return fmt.Errorf("IPAM state of %s: %w", n.Name, err)
		}
		for _, a := range st.Allocations {
			eniOf[a.IP] = a.ENI.ID
		}
	}
	w := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(w, "  POD\tNODE\tPOD IP\tFROM ENI")
	for _, p := range pods {
		fmt.Fprintf(w, "  %s\t%s\t%s\t%s\n", p.Name, p.Node, p.IP, eniOf[p.IP])
	}
	w.Flush()
	return nil
}

func (d *demo) service(ctx context.Context) error {
	d.title("A ClusterIP Service in front of them")
	want := d.backendSet(ctx)
	conv := d.watchConvergence(ctx, want)
	svc, err := d.kube.CoreV1().Services(demoNS).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: demoService},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{{
			Name: "http", Port: servicePort, TargetPort: intstr.FromInt32(webPort), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create Service %s/%s: %w", demoNS, demoService, err)
	}
	d.vip = svc.Spec.ClusterIP
	conv.vip <- d.vip
	say("  service/%s: ClusterIP %s port %d -> pods' port %d", demoService, d.vip, servicePort, webPort)
	took, err := conv.wait()
	if err != nil {
		return err
	}
	say("\nThe controller-manager turned the Service and the Ready pods into an EndpointSlice; both")
	say("agents saw it and wrote %s:%d with its 3 backends into their node's eBPF service map,", d.vip, servicePort)
	say("%s after the Service was created. There is no kube-proxy and no iptables rule:", took.Round(time.Millisecond))
	say("the lookup and DNAT happen in a tc program on each pod's host-side veth.")
	return nil
}

func (d *demo) client(ctx context.Context) error {
	d.title(fmt.Sprintf("%d requests from a client pod through the ClusterIP", d.requests))
	var p PodInfo
	if err := d.c.do(ctx, "POST", "/v1/pods", PodRequest{Namespace: demoNS, Name: "client", Node: d.node(1)}, &p); err != nil {
		return err
	}
	say("  pod/client runs on %s (%s); each request is a new TCP connection to %s:%d:\n", p.Node, p.IP, d.vip, servicePort)
	if err := d.round(ctx); err != nil {
		return err
	}
	say("\nThe client's node picked a backend per connection and rewrote the destination to that")
	say("pod's VPC address; requests for a pod on the other node then crossed the VPC router.")
	return nil
}

// round sends the demo's requests from the client and prints how they spread.
func (d *demo) round(ctx context.Context) error {
	res, err := ask(ctx, d.c, AskRequest{Namespace: demoNS, Pod: "client", Addr: fmt.Sprintf("%s:%d", d.vip, servicePort), Count: d.requests})
	if err != nil {
		return err
	}
	printTally(res, "  ")
	perNode := map[string]int{}
	for _, a := range res.Answers {
		if f := strings.Fields(a); len(f) >= 5 {
			perNode[f[4]]++
		}
	}
	nodes := make([]string, 0, len(perNode))
	for n := range perNode {
		nodes = append(nodes, fmt.Sprintf("%d on %s", perNode[n], n))
	}
	sort.Strings(nodes)
	say("\n  %d of %d answered: %s.", len(res.Answers), len(res.Answers)+len(res.Errors), strings.Join(nodes, ", "))
	if len(res.Errors) > 0 {
		return fmt.Errorf("%d requests failed (see above)", len(res.Errors))
	}
	return nil
}

func (d *demo) scaleUp(ctx context.Context) error {
	d.title("Scale the web backends from 3 to 5")
	conv := d.watchConvergence(ctx, nil)
	t0 := time.Now()
	var pods []PodInfo
	for _, i := range []int{3, 4} {
		p, err := d.webPod(ctx, i, d.node(i))
		if err != nil {
			return err
		}
		pods = append(pods, p)
	}
	ready := time.Now()
	conv.want <- d.backendSet(ctx)
	conv.vip <- d.vip
	took, err := conv.wait()
	if err != nil {
		return err
	}
	if err := d.podTable(ctx, pods); err != nil {
		return err
	}
	say("\nBoth nodes' service maps held all 5 backends %s after the scale started (CNI ADD, Ready", took.Round(time.Millisecond))
	say("and the EndpointSlice update included), %s after the last pod was reported Ready.\n",
		max(0, took-ready.Sub(t0)).Round(time.Millisecond))
	return d.round(ctx)
}

func (d *demo) scaleDown(ctx context.Context) error {
	d.title("Scale back down to 2")
	// The remaining backends are known before anything is deleted, so the clock can start
	// at the first delete.
	gone := map[string]bool{}
	st, err := d.c.status(ctx)
	if err != nil {
		return err
	}
	for _, p := range st.Pods {
		if p.Namespace == demoNS && (p.Name == "web-2" || p.Name == "web-3" || p.Name == "web-4") {
			gone[p.IP] = true
		}
	}
	var want []netip.AddrPort
	for _, b := range d.backendSet(ctx) {
		if !gone[b.Addr().String()] {
			want = append(want, b)
		}
	}
	conv := d.watchConvergence(ctx, want)
	conv.vip <- d.vip
	for _, i := range []int{2, 3, 4} {
		if err := d.c.do(ctx, "DELETE", fmt.Sprintf("/v1/pods/%s/web-%d", demoNS, i), nil, nil); err != nil {
			return err
		}
	}
	took, err := conv.wait()
	if err != nil {
		return err
	}
	say("  deleted web-2, web-3, web-4 (Pod objects first, then CNI DEL, as the kubelet does)")
	say("\nBoth nodes' service maps were down to the 2 remaining backends %s after the first delete.", took.Round(time.Millisecond))
	say("Connections already open to a removed backend are not cut; new ones never pick it.\n")
	return d.round(ctx)
}

func (d *demo) dumps(ctx context.Context) error {
	n := d.st.Nodes[0]
	d.title(fmt.Sprintf("What tern holds on %s (tern-lab ternctl NODE ...)", n.Name))
	for _, c := range []struct {
		args []string
		why  string
	}{
		{[]string{"service", "list"}, "each frontend and its backends, from the pinned maps"},
		{[]string{"bpf", "lb", "list"}, "the same as stored: tern_services, tern_backends, tern_lb_members"},
		{[]string{"bpf", "ct", "list", "--port", fmt.Sprint(d.apiNodePort)}, "conntrack of the NodePort flows"},
	} {
		say("\n$ tern-lab ternctl %s %s    # %s", n.Name, strings.Join(c.args, " "), c.why)
		if err := printIndented(func(w io.Writer) error { return ternctl.Print(ctx, w, n.PinRoot, n.Socket, c.args...) }); err != nil {
			return err
		}
	}
	say("\nThe service list has the web and api ClusterIPs, the api node port on the node's addresses,")
	say("and %s, the apiserver's own \"kubernetes\" Service. Its endpoint is %s, an address of the", "10.96.0.1:443", lab.APIServerAddr)
	say("VPC router bridged to the apiserver on the root namespace's loopback, where a managed control")
	say("plane's internal load balancer would be: pods and host-network processes reach the apiserver")
	say("through the ClusterIP, as in-cluster clients do first.")
	say("Each NodePort flow has a conntrack entry: the external client's tuple, translated to a backend")
	say("per packet by tc on the ENI. Replies of this node's backend find theirs by the revnat entry;")
	say("flows SNATed to the other node's backend come back through the SNAT table (bpf nat list).")
	say("The host-network connections of step %d need no translation state: the socket hooks", d.hostStep)
	say("translated them once, at connect().")
	for _, n := range d.st.Nodes {
		say("\n$ tern-lab ternctl %s ipam show     # the agent's ENIs and pod addresses", n.Name)
		if err := printIndented(func(w io.Writer) error { return ternctl.Print(ctx, w, n.PinRoot, n.Socket, "ipam", "show") }); err != nil {
			return err
		}
	}
	return nil
}

// printIndented prints what fn writes, two spaces in.
func printIndented(fn func(io.Writer) error) error {
	var b bytes.Buffer
	if err := fn(&b); err != nil {
		return err
	}
	for _, l := range strings.Split(strings.TrimRight(b.String(), "\n"), "\n") {
		if strings.TrimSpace(l) == "" {
			fmt.Println()
			continue
		}
		fmt.Println("  " + l)
	}
	return nil
}

func (d *demo) explore(took time.Duration) {
	d.title("Explore, then tear down")
	bin := binHint()
	n1 := d.st.Nodes[0]
	say("The demo took %s. The lab keeps running; things to try:\n", took.Round(100*time.Millisecond))
	tip := func(cmd, why string) {
		if why == "" {
			say("  %s", cmd)
			return
		}
		say("  %-62s # %s", cmd, why)
	}
	tip(bin+" status", "nodes, pods, their namespaces")
	tip(fmt.Sprintf("%s ask -n %s -count 20 client %s:%d", bin, demoNS, d.vip, servicePort), "more requests")
	tip(fmt.Sprintf("%s pod run -n %s -l app=web -http %d web-9", bin, demoNS, webPort), "one more backend")
	tip(fmt.Sprintf("%s pod delete -n %s web-0", bin, demoNS), "one less")
	tip(fmt.Sprintf("%s ternctl %s bpf ct list", bin, n1.Name), "conntrack: client -> VIP -> backend")
	tip(fmt.Sprintf("%s exec %s -- %s probe -count 5 %s:%d", bin, n1.Name, bin, d.vip, servicePort), "a host-network client (socket LB)")
	if d.nodePortAddr != "" {
		tip(fmt.Sprintf("%s exec %s -- %s probe -count 5 %s", bin, externalName, bin, d.nodePortAddr), "the NodePort from outside")
	}
	tip(fmt.Sprintf("%s ternctl %s bpf metrics list", bin, n1.Name), "datapath counters")
	tip(fmt.Sprintf("%s exec -n %s client -- ip route", bin, demoNS), "any command in a pod's (or node's) netns")
	tip("bpftool map dump pinned "+filepath.Join(n1.PinRoot, "tern_services"), "")
	tip(fmt.Sprintf("KUBECONFIG=%s kubectl get pods,svc,endpointslices -n %s -o wide", d.st.Kubeconfig, demoNS), "with your own kubectl")
	say("  logs: %s (the lab), %s (an agent)", filepath.Join(d.st.Dir, logFile), n1.AgentLog)
	say("\nWhen done:  make demo-down   (or %s down): removes the namespaces, processes, pins and %s.", bin, d.st.Dir)
}

// backendSet is every Ready web pod's IP:port as the lab knows it now.
func (d *demo) backendSet(ctx context.Context) []netip.AddrPort {
	st, err := d.c.status(ctx)
	if err != nil {
		return nil
	}
	var out []netip.AddrPort
	for _, p := range st.Pods {
		if p.Namespace == demoNS && strings.HasPrefix(p.Name, "web-") {
			if a, err := netip.ParseAddr(p.IP); err == nil {
				out = append(out, netip.AddrPortFrom(a, webPort))
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Compare(out[j]) < 0 })
	return out
}

// convergence polls every node's pinned service map from the moment it is made, so that
// the time it reports is when the maps changed, not when the demo looked.
type convergence struct {
	want chan []netip.AddrPort
	vip  chan string
	done chan time.Duration
	err  chan error
}

// watchConvergence starts polling; want (if nil here) and the VIP are sent later, once known.
func (d *demo) watchConvergence(ctx context.Context, want []netip.AddrPort) *convergence {
	c := &convergence{want: make(chan []netip.AddrPort, 1), vip: make(chan string, 1), done: make(chan time.Duration, 1),
		err: make(chan error, 1)}
	if want != nil {
		c.want <- want
	}
	t0 := time.Now()
	nodes := d.st.Nodes
	go func() {
		target, vip := <-c.want, ""
		deadline := t0.Add(30 * time.Second)
		last := ""
		for {
			if vip == "" {
				select {
				case vip = <-c.vip:
				default:
				}
			}
			if vip != "" {
				ok := true
				for _, n := range nodes {
					got, err := frontendBackends(n.PinRoot, vip)
					if err != nil {
						last = err.Error()
						ok = false
						break
					}
					if !equal(got, target) {
						last = fmt.Sprintf("%s has %v, want %v", n.Name, got, target)
						ok = false
						break
					}
				}
				if ok {
					c.done <- time.Since(t0)
					return
				}
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				c.err <- fmt.Errorf("the service maps did not converge within 30s: %s", last)
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	return c
}

func (c *convergence) wait() (time.Duration, error) {
	select {
	case d := <-c.done:
		return d, nil
	case err := <-c.err:
		return 0, err
	}
}

func frontendBackends(pinRoot, vip string) ([]netip.AddrPort, error) {
	svcs, err := ternctl.ReadServicesAt(pinRoot)
	if err != nil {
		return nil, err
	}
	front := netip.AddrPortFrom(netip.MustParseAddr(vip), servicePort)
	for _, s := range svcs {
		if s.Frontend == front && s.Proto == "TCP" {
			out := s.BackendAddrs()
			sort.Slice(out, func(i, j int) bool { return out[i].Compare(out[j]) < 0 })
			return out, nil
		}
	}
	return nil, nil
}

func equal(a, b []netip.AddrPort) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
