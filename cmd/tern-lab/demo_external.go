//go:build linux

package main

import (
	"context"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/ternctl"
)

// The demo's NodePort Service and its backends (one per node).
const (
	nodePortService = "api"
	nodePortApp     = "api"
)

// hello is what a lab pod's HTTP server answers (lab.Pod.ServeHTTP):
// "hello from <pod> on <node> (<pod ip>), client <source address the pod saw>".
type hello struct{ pod, node, client string }

func parseHello(s string) (hello, bool) {
	f := strings.Fields(s)
	if len(f) != 8 || f[0] != "hello" || f[1] != "from" || f[3] != "on" || f[6] != "client" {
		return hello{}, false
	}
	return hello{pod: f[2], node: f[4], client: f[7]}, true
}

// hostNetwork is a host-network process on a node using the ClusterIP: the node's own
// namespace, in the cgroup its agent attached the socket hooks to.
func (d *demo) hostNetwork(ctx context.Context) error {
	n := d.st.Nodes[0]
	addr := fmt.Sprintf("%s:%d", d.vip, servicePort)
	d.title(fmt.Sprintf("A host-network process on %s using the ClusterIP", n.Name))
	d.hostStep = d.step
	say("A process in %s's own network namespace (no pod: the kubelet, a hostNetwork pod, an", n.Name)
	say("operator's curl) connects to %s. tern's cgroup socket hooks pick the backend in connect():", addr)
	say("the socket is connected to the pod's address from the start, so no packet is ever rewritten.")
	say("(The lab attaches them to a cgroup per node, %s; on a real node it is the cgroup", n.Cgroup)
	say("v2 root, as Cilium does.)\n")
	say("$ tern-lab exec %s -- tern-lab probe -count %d %s\n", n.Name, d.requests, addr)
	res, err := probeFrom(ctx, n.NetNS, n.Cgroup, addr, d.requests)
	if err != nil {
		return err
	}
	tally := &AskResult{Answers: []string{}, Errors: []string{}}
	peers := map[string]int{}
	for _, a := range res {
		if a.Err != "" {
			tally.Errors = append(tally.Errors, a.Err)
			continue
		}
		tally.Answers = append(tally.Answers, a.Answer)
		peers[a.Peer]++
	}
	printTally(tally, "  ")
	if len(tally.Errors) > 0 {
		return fmt.Errorf("%d of %d host-network requests to %s failed (see above)", len(tally.Errors), len(res), addr)
	}
	if len(peers) != 1 || peers[addr] != len(res) {
		return fmt.Errorf("getpeername of the host-network sockets gave %v, want the ClusterIP %s for all %d", peers, addr, len(res))
	}
	say("\n  getpeername() on every one of the %d sockets: %s, the ClusterIP. The process never", len(res), addr)
	say("  sees a pod address; the backend sees the node's address as the client.")
	return nil
}

// nodePort creates a NodePort Service with a backend on each node and reaches it from a
// client outside the VPC on every node's address.
func (d *demo) nodePort(ctx context.Context) error {
	d.title("A NodePort Service, reached from a client outside the VPC")
	var pods []PodInfo
	for i := range d.st.Nodes {
		var p PodInfo
		if err := d.c.do(ctx, "POST", "/v1/pods", PodRequest{Namespace: demoNS, Name: fmt.Sprintf("%s-%d", nodePortApp, i),
			Node: d.node(i), Labels: map[string]string{"app": nodePortApp}, HTTPPort: webPort}, &p); err != nil {
			return err
		}
		pods = append(pods, p)
	}
	svc, err := d.kube.CoreV1().Services(demoNS).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: nodePortService},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, Selector: map[string]string{"app": nodePortApp},
			Ports: []corev1.ServicePort{{Name: "http", Port: servicePort, TargetPort: intstr.FromInt32(webPort), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create Service %s/%s: %w", demoNS, nodePortService, err)
	}
	nodePort := int(svc.Spec.Ports[0].NodePort)
	d.apiNodePort = nodePort
	d.nodePortAddr = fmt.Sprintf("%s:%d", d.st.Nodes[0].PrimaryIP, nodePort)
	if err := d.podTable(ctx, pods); err != nil {
		return err
	}
	say("\n  service/%s: type NodePort, ClusterIP %s port %d, node port %d -> pods' port %d", nodePortService,
		svc.Spec.ClusterIP, servicePort, nodePort, webPort)
	var want []netip.AddrPort
	for _, p := range pods {
		want = append(want, netip.AddrPortFrom(netip.MustParseAddr(p.IP), webPort))
	}
	took, err := waitNodePort(ctx, d.st.Nodes, nodePort, want)
	if err != nil {
		return err
	}
	say("  every node's service map had the node port with both backends %s after the create.", took.Round(time.Millisecond))

	ext := d.st.External
	say("\nThe client is %s: a namespace of its own behind the VPC router, outside the VPC", ext.IP)
	say("(an office, the internet behind an EIP). It connects to each node's address on port %d;", nodePort)
	say("each answer names the backend and the source address that backend saw.")
	for _, n := range d.st.Nodes {
		addr := fmt.Sprintf("%s:%d", n.PrimaryIP, nodePort)
		say("\n$ tern-lab exec %s -- tern-lab probe -count %d %s      # %s", externalName, d.requests, addr, n.Name)
		res, err := probeFrom(ctx, ext.NetNS, "", addr, d.requests)
		if err != nil {
			return err
		}
		tally := &AskResult{Answers: []string{}, Errors: []string{}}
		var wrong []string
		for _, a := range res {
			if a.Err != "" {
				tally.Errors = append(tally.Errors, a.Err)
				continue
			}
			tally.Answers = append(tally.Answers, a.Answer)
			// externalTrafficPolicy Cluster: a backend on the node the client reached sees
			// the client; one on the other node sees that node's address (SNAT), so that
			// its reply returns through the node that holds the translation.
			h, ok := parseHello(a.Answer)
			wantSrc := ext.IP
			if ok && h.node != n.Name {
				wantSrc = n.PrimaryIP
			}
			if !ok || h.client != wantSrc {
				wrong = append(wrong, fmt.Sprintf("%q (want client %s)", a.Answer, wantSrc))
			}
		}
		printTally(tally, "  ")
		if len(tally.Errors) > 0 {
			return fmt.Errorf("%d of %d requests from the external client to the NodePort %s failed (see above)",
				len(tally.Errors), len(res), addr)
		}
		if len(wrong) > 0 {
			return fmt.Errorf("NodePort %s: the backends saw unexpected sources: %s", addr, strings.Join(wrong, "; "))
		}
	}
	say("\nexternalTrafficPolicy is Cluster (the default): the node the client reached picks any")
	say("backend. One on the other node sees the receiving node's address: that node SNATs the flow")
	say("so that the reply comes back through it. One on the receiving node sees the client's own")
	say("address, where kube-proxy would masquerade it too (a difference on purpose: the reply needs")
	say("no SNAT to find its way; docs/conformance.md). The translation is a tc program on the node's ENI.")
	return nil
}

// waitNodePort polls every node's pinned service map until a frontend on nodePort holds
// exactly want, and returns how long that took.
func waitNodePort(ctx context.Context, nodes []NodeInfo, nodePort int, want []netip.AddrPort) (time.Duration, error) {
	sort.Slice(want, func(i, j int) bool { return want[i].Compare(want[j]) < 0 })
	t0 := time.Now()
	deadline := t0.Add(30 * time.Second)
	for {
		last := ""
		for _, n := range nodes {
			svcs, err := ternctl.ReadServicesAt(n.PinRoot)
			if err != nil {
				return 0, err
			}
			found := false
			for _, s := range svcs {
				if int(s.Frontend.Port()) != nodePort || s.Proto != "TCP" {
					continue
				}
				got := s.BackendAddrs()
				sort.Slice(got, func(i, j int) bool { return got[i].Compare(got[j]) < 0 })
				if equal(got, want) {
					found = true
					break
				}
				last = fmt.Sprintf("%s: %s has %v, want %v", n.Name, s.Frontend, got, want)
			}
			if !found {
				if last == "" {
					last = fmt.Sprintf("%s has no frontend on port %d", n.Name, nodePort)
				}
				break
			}
		}
		if last == "" {
			return time.Since(t0), nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return 0, fmt.Errorf("the node port %d was not in every node's service map within 30s: %s", nodePort, last)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
