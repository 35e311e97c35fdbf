//go:build linux

package lab_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/ternctl"
	"github.com/tern-net/tern/ternctl/ternctltest"
	"github.com/tern-net/tern/test/lab"
)

// ternctlOn runs ternctl against node n (its pins and socket), in n's network namespace as
// it would run on the node, and returns stdout, stderr and the exit code.
func ternctlOn(ctx context.Context, n *lab.Node, stdout, stderr io.Writer, args ...string) int {
	var code int
	_ = nsutil.Do(n.NS, func() error {
		code = ternctl.Main(ctx, append([]string{"--pin-root", n.PinRoot(), "--socket", n.Socket()}, args...), stdout, stderr)
		return nil
	})
	return code
}

func ternctlJSON[T any](t *testing.T, ctx context.Context, n *lab.Node, args ...string) T {
	t.Helper()
	var out, errb bytes.Buffer
	if code := ternctlOn(ctx, n, &out, &errb, append(args, "-o", "json")...); code != 0 {
		t.Fatalf("ternctl %s: exit %d: %s", strings.Join(args, " "), code, errb.String())
	}
	var v T
	if err := json.Unmarshal(out.Bytes(), &v); err != nil {
		t.Fatalf("ternctl %s -o json: %v\n%s", strings.Join(args, " "), err, out.String())
	}
	return v
}

// TestTernctlAgainstALiveAgent runs every ternctl command against a lab node's agent with a
// Service, a backend and a client that used it, and checks the parsed JSON (YAML for one):
// status, ipam show, service list, bpf lb/ct/endpoint/metrics list, monitor (a drop caused on
// purpose shows within a second); then, with a NetworkPolicy denying the client: monitor
// --type policy (the denial within a second, naming the policy), policy get, bpf policy get
// and the tern_policy_verdict metrics with the denial counted; bpf bandwidth list after an
// annotation; bpf nat list; then, with the agent stopped, that the map views still work and
// the agent's commands exit 3.
func TestTernctlAgainstALiveAgent(t *testing.T) {
	l := upKubernetes(t, lab.Options{Nodes: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	n := l.Node(0)
	c := l.Client()
	const ns = "web"
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	svc, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := svc.Spec.ClusterIP
	backend, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "web-0", Node: n.Name, Labels: map[string]string{"app": "web"}, HTTPPort: 8080})
	if err != nil {
		t.Fatal(err)
	}
	client, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "client", Node: n.Name})
	if err != nil {
		t.Fatal(err)
	}
	frontend, wantBackend := vip+":80", backend.IP.String()+":8080"
	// Wait for the backend in the node's maps (the agent's endpoint watch), then use it.
	waitBackends(t, n, netip.MustParseAddrPort(frontend), "TCP", netip.MustParseAddrPort(wantBackend))
	if _, err := client.HTTPGet(ctx, "http://"+frontend+"/"); err != nil {
		t.Fatalf("client through %s: %v", frontend, err)
	}
	clientVeth := api.HostVethName(client.ContainerID, "eth0")

	t.Run("status", func(t *testing.T) {
		st := ternctlJSON[ternctl.Status](t, ctx, n, "status")
		if m := st.Agent.BandwidthMode; m != "edt" && m != "policer" {
			t.Errorf("bandwidth mode %q, want edt or policer", m)
		}
		if !st.Agent.Reachable || !st.Agent.Ready || !st.Agent.Readyz || len(st.Agent.Components) == 0 {
			t.Errorf("agent: %+v", st.Agent)
		}
		for _, comp := range st.Agent.Components {
			if !comp.Ready {
				t.Errorf("component %s not ready: %s", comp.Name, comp.Reason)
			}
		}
		if !st.Datapath.Loaded || st.IPAM == nil || st.IPAM.Node != n.Name || st.Kernel.Release == "" || !st.Kernel.Features["map_ringbuf"] {
			t.Errorf("datapath %+v, ipam %+v, kernel %+v", st.Datapath, st.IPAM, st.Kernel)
		}
		ct := false
		for _, m := range st.Datapath.Maps {
			ct = ct || (m.Name == loader.PodMapTernConntrack && m.Entries >= 2 && m.MaxEntries > 0)
		}
		if !ct {
			t.Errorf("no tern_conntrack with the client's flow among the maps: %+v", st.Datapath.Maps)
		}
		dirs := map[string]string{}
		for _, a := range st.Attachments {
			if a.Interface == clientVeth {
				dirs[a.Direction] = a.Mode + " " + a.Program
			}
		}
		if dirs["ingress"] != "tcx tern_from_pod" || dirs["egress"] != "tcx tern_to_pod" {
			t.Errorf("attach points of the client's veth %s: %v; all: %+v", clientVeth, dirs, st.Attachments)
		}
	})

	t.Run("ipam show", func(t *testing.T) {
		v := ternctlJSON[ternctl.IPAMView](t, ctx, n, "ipam", "show")
		holder := map[string]string{}
		for _, e := range v.ENIs {
			if e.MAC == "" || e.VSwitchID == "" {
				t.Errorf("ENI %s lacks MAC or vSwitch: %+v", e.ID, e)
			}
			for _, ip := range e.IPs {
				holder[ip.IP] = ip.Pod
			}
		}
		if v.Node != n.Name || v.InUse != 2 || v.Pool.ENIQuota == 0 || v.MaxPods == 0 || v.IPQuotaUsed <= 0 ||
			holder[client.IP.String()] != ns+"/client" || holder[backend.IP.String()] != ns+"/web-0" {
			t.Errorf("ipam show: %+v (address holders %v)", v, holder)
		}
	})

	t.Run("service list", func(t *testing.T) {
		svcs := ternctlJSON[[]ternctl.Service](t, ctx, n, "service", "list")
		for _, s := range svcs {
			if s.Frontend.String() == frontend {
				if s.Proto != "TCP" || s.Type != "ClusterIP" || len(s.Backends) != 1 || s.Backends[0].Address.String() != wantBackend ||
					s.Backends[0].State != "active" {
					t.Errorf("service %s: %+v", frontend, s)
				}
				return
			}
		}
		t.Errorf("no %s in %+v", frontend, svcs)
	})

	t.Run("bpf lb list", func(t *testing.T) {
		entries := ternctlJSON[[]ternctl.LBEntry](t, ctx, n, "bpf", "lb", "list")
		var id uint32
		for _, e := range entries {
			if e.Map == loader.PodMapTernServices && e.Frontend.String() == frontend {
				id = e.ServiceID
			}
		}
		ok := false
		for _, e := range entries {
			ok = ok || (id != 0 && e.Map == loader.PodMapTernBackends && e.ServiceID == id && e.Backend.String() == wantBackend && e.MemberSlot == e.Slot)
		}
		if !ok {
			t.Errorf("no frontend %s with backend %s in %+v", frontend, wantBackend, entries)
		}
		for _, e := range entries {
			if e.Map == loader.PodMapTernServices && e.Frontend.String() == frontend && (e.Kind != "ClusterIP" || e.Scope != "all") {
				t.Errorf("frontend %s: kind %q scope %q, want ClusterIP, all", frontend, e.Kind, e.Scope)
			}
		}

		// A NodePort Service with externalTrafficPolicy Local: its NodePort frontends say
		// NodePort, each with an in-cluster twin (scope internal), and its ClusterIP says
		// ClusterIP.
		local, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "web-local"},
			Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal,
				Selector: map[string]string{"app": "web"},
				Ports:    []corev1.ServicePort{{Name: "http", Port: 81, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := c.CoreV1().Services(ns).Delete(ctx, "web-local", metav1.DeleteOptions{}); err != nil {
				t.Errorf("delete web-local: %v", err)
			}
		}()
		nodePort := uint16(local.Spec.Ports[0].NodePort)
		for deadline := time.Now().Add(20 * time.Second); ; {
			kinds := map[string]bool{}
			for _, e := range ternctlJSON[[]ternctl.LBEntry](t, ctx, n, "bpf", "lb", "list") {
				switch {
				case e.Map != loader.PodMapTernServices:
				case e.Frontend.Port() == nodePort:
					kinds[e.Kind+"/"+e.Scope] = true
				case e.Frontend.Addr().String() == local.Spec.ClusterIP && e.Frontend.Port() == 81:
					kinds[e.Kind+"/"+e.Scope] = true
				}
			}
			if kinds["NodePort/all"] && kinds["NodePort/internal"] && kinds["ClusterIP/all"] && len(kinds) == 3 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("web-local's frontends (NodePort %d, ClusterIP %s:81) listed as %v; want NodePort/all, NodePort/internal, ClusterIP/all",
					nodePort, local.Spec.ClusterIP, kinds)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})

	t.Run("bpf ct list", func(t *testing.T) {
		flows := ternctlJSON[[]ternctl.Flow](t, ctx, n, "bpf", "ct", "list", "--pod", ns+"/client", "--port", "80")
		ok := false
		for _, f := range flows {
			ok = ok || (f.Kind == "service" && f.From.Addr() == client.IP && f.To.String() == frontend && f.NATAddress.String() == wantBackend)
			if f.From.Addr() != client.IP && f.To.Addr() != client.IP && f.NATAddress.Addr() != client.IP {
				t.Errorf("--pod %s/client listed another pod's flow %+v", ns, f)
			}
		}
		if !ok {
			t.Errorf("no service flow client -> %s -> %s in %+v", frontend, wantBackend, flows)
		}
		if none := ternctlJSON[[]ternctl.Flow](t, ctx, n, "bpf", "ct", "list", "--address", "10.255.255.254"); len(none) != 0 {
			t.Errorf("--address 10.255.255.254 lists %+v", none)
		}
	})

	t.Run("bpf endpoint list", func(t *testing.T) {
		eps := ternctlJSON[[]ternctl.Endpoint](t, ctx, n, "bpf", "endpoint", "list", "--pod", ns+"/client")
		if len(eps) != 1 || eps[0].Address != client.IP || eps[0].Pod != ns+"/client" || eps[0].Interface != clientVeth || eps[0].MAC == "" {
			t.Errorf("endpoint of the client (%s on %s): %+v", client.IP, clientVeth, eps)
		}
		if all := ternctlJSON[[]ternctl.Endpoint](t, ctx, n, "bpf", "endpoint", "list"); len(all) != 2 {
			t.Errorf("endpoints: %+v, want the 2 pods", all)
		}
	})

	t.Run("bpf metrics list", func(t *testing.T) {
		var out, errb bytes.Buffer
		if code := ternctlOn(ctx, n, &out, &errb, "bpf", "metrics", "list", "-o", "yaml"); code != 0 {
			t.Fatalf("exit %d: %s", code, errb.String())
		}
		var ms []ternctl.Metric
		if err := yaml.Unmarshal(out.Bytes(), &ms); err != nil {
			t.Fatalf("-o yaml: %v\n%s", err, out.String())
		}
		ok := false
		for _, m := range ms {
			ok = ok || (m.Reason == "svc_forward" && m.Direction == "from-pod" && m.Packets > 0 && m.Bytes > m.Packets*40)
		}
		if !ok {
			t.Errorf("no svc_forward from-pod packets: %+v", ms)
		}
	})

	t.Run("monitor", func(t *testing.T) {
		mctx, mcancel := context.WithTimeout(ctx, 20*time.Second)
		defer mcancel()
		lines, done := startMonitor(t, mctx, n, "monitor", "--pod", ns+"/client", "--reason", "drop_bad_ip", "--count", "1", "-o", "json")
		sent := time.Now()
		if err := sendBadIPFrom(n, client, clientVeth, backend.IP.As4()); err != nil {
			t.Fatal(err)
		}
		select {
		case line, ok := <-lines:
			if !ok {
				t.Fatalf("monitor printed nothing (exit %d)", <-done)
			}
			took := time.Since(sent)
			var ev ternctl.DropEvent
			if err := json.Unmarshal([]byte(line), &ev); err != nil {
				t.Fatalf("%q: %v", line, err)
			}
			if ev.Reason != "drop_bad_ip" || ev.Direction != "from-pod" || ev.Source.Addr() != client.IP ||
				ev.Destination.Addr() != backend.IP || ev.Pod != ns+"/client" || ev.Interface != clientVeth {
				t.Errorf("event %+v", ev)
			}
			t.Logf("drop shown %s after the send: %s", took, line)
			if took > time.Second {
				t.Errorf("took %s, want under a second", took)
			}
		case <-time.After(time.Second):
			t.Fatal("no drop shown within a second")
		}
		if code := <-done; code != 0 {
			t.Errorf("monitor --count 1 exited %d", code)
		}
	})

	// NetworkPolicy: web-0 takes only app=web pods (itself) on 8080, so the client is
	// denied; the denial shows in monitor within a second naming the policy, in the policy
	// views with its counters, and in /metrics.
	_, err = c.NetworkingV1().NetworkPolicies(ns).Create(ctx, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "web-friends"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: ptrTo(intstr.FromInt32(8080))}}}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const policyName = ns + "/web-friends"
	backendAddr := backend.IP.String()
	// Wait for the rules in the node's maps (read directly, as bpf policy get does).
	for deadline := time.Now().Add(30 * time.Second); ; {
		v := ternctlJSON[api.PolicyView](t, ctx, n, "bpf", "policy", "get", backendAddr)
		if v.IsolatedIngress && len(v.Policies) == 1 && v.Policies[0].Name == policyName {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("policy %s never reached %s's maps: %+v", policyName, n.Name, v)
		}
		time.Sleep(20 * time.Millisecond)
	}

	t.Run("monitor policy", func(t *testing.T) {
		mctx, mcancel := context.WithTimeout(ctx, 20*time.Second)
		defer mcancel()
		lines, done := startMonitor(t, mctx, n, "monitor", "--pod", ns+"/client", "--type", "policy", "--count", "1", "-o", "json")
		sent := time.Now()
		denied := make(chan error, 1)
		go func() {
			dctx, dcancel := context.WithTimeout(ctx, 2*time.Second)
			defer dcancel()
			_, err := client.HTTPGet(dctx, "http://"+wantBackend+"/")
			denied <- err
		}()
		defer func() {
			if err := <-denied; err == nil {
				t.Errorf("client reached %s through a policy that denies it", wantBackend)
			}
		}()
		select {
		case line, ok := <-lines:
			if !ok {
				t.Fatalf("monitor printed nothing (exit %d)", <-done)
			}
			took := time.Since(sent)
			var ev ternctl.PolicyEvent
			if err := json.Unmarshal([]byte(line), &ev); err != nil {
				t.Fatalf("%q: %v", line, err)
			}
			if ev.Type != "policy" || ev.Verdict != "denied" || ev.Direction != "ingress" || ev.Policy != policyName ||
				ev.Pod != ns+"/web-0" || ev.PodAddress != backend.IP || ev.Peer != client.IP || ev.PeerPod != ns+"/client" ||
				ev.Port != 8080 || ev.Proto != "TCP" || ev.Slot == 0 {
				t.Errorf("event %+v", ev)
			}
			t.Logf("denial shown %s after the connect: %s", took, line)
			if took > time.Second {
				t.Errorf("took %s, want under a second", took)
			}
		case <-time.After(time.Second):
			t.Fatal("no policy denial shown within a second")
		}
		if code := <-done; code != 0 {
			t.Errorf("monitor --count 1 exited %d", code)
		}
	})

	checkPolicyView := func(t *testing.T, v api.PolicyView, fromAgent bool) {
		t.Helper()
		if !v.IsolatedIngress || v.IsolatedEgress || v.Identity == 0 || v.Address != backendAddr || v.Pod != ns+"/web-0" || len(v.Policies) != 1 {
			t.Fatalf("view %+v", v)
		}
		p := v.Policies[0]
		if p.Name != policyName || p.Slot == 0 || len(p.Isolates) != 1 || p.Isolates[0] != "ingress" || len(p.Rules) != 1 {
			t.Fatalf("policy %+v", p)
		}
		r := p.Rules[0]
		if r.Direction != "ingress" || r.Protocol != "TCP" || r.Ports != "8080" || r.PeerIdentity == 0 {
			t.Errorf("rule %+v", r)
		}
		// The agent names the peer by its labels, the maps by the addresses holding it.
		if fromAgent && !strings.Contains(r.Peer, `"app"="web"`) || !fromAgent && r.Peer != "pods "+backendAddr {
			t.Errorf("peer %q: want web-0's labels (agent) or address (maps)", r.Peer)
		}
		if p.Counters.Ingress.DeniedPackets == 0 || p.Counters.Ingress.DeniedBytes < 40*p.Counters.Ingress.DeniedPackets {
			t.Errorf("counters %+v: want the client's denied SYNs", p.Counters)
		}
	}
	t.Run("policy get", func(t *testing.T) {
		checkPolicyView(t, ternctlJSON[api.PolicyView](t, ctx, n, "policy", "get", ns+"/web-0"), true)
		var out, errb bytes.Buffer
		if code := ternctlOn(ctx, n, &out, &errb, "policy", "get", ns+"/nope"); code != ternctl.ExitFailure {
			t.Errorf("policy get of an unknown pod: exit %d (%s), want %d", code, errb.String(), ternctl.ExitFailure)
		}
	})
	t.Run("bpf policy get", func(t *testing.T) {
		v := ternctlJSON[api.PolicyView](t, ctx, n, "bpf", "policy", "get", ns+"/web-0")
		if v.Enforced == nil || !*v.Enforced {
			t.Errorf("enforced %v", v.Enforced)
		}
		checkPolicyView(t, v, false)
	})
	t.Run("policy metrics", func(t *testing.T) {
		text, err := api.NewClient(n.Socket(), 5*time.Second).Metrics(ctx)
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, l := range strings.Split(text, "\n") {
			if strings.HasPrefix(l, `tern_policy_verdict_packets_total{direction="ingress",policy="`+policyName+`",verdict="denied"} `) &&
				!strings.HasSuffix(l, " 0") {
				found = true
			}
		}
		if !found {
			t.Errorf("no denied packets of %s in /metrics:\n%s", policyName, grepLines(text, "tern_policy"))
		}
	})

	t.Run("bpf bandwidth list", func(t *testing.T) {
		patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{
			"kubernetes.io/egress-bandwidth": "10M"}}})
		if _, err := c.CoreV1().Pods(ns).Patch(ctx, "client", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(30 * time.Second); ; {
			bws := ternctlJSON[[]ternctl.Bandwidth](t, ctx, n, "bpf", "bandwidth", "list")
			if len(bws) == 1 {
				b := bws[0]
				if b.Address != client.IP || b.Pod != ns+"/client" || b.Interface != clientVeth || b.EgressBitsPerSecond != 10_000_000 ||
					b.IngressBitsPerSecond != 0 || (b.Mode != "edt" && b.Mode != "policer") || b.EgressBurst == "" {
					t.Errorf("bandwidth %+v", b)
				}
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("bpf bandwidth list: %+v after 30 s, want the client's 10M egress", bws)
			}
			time.Sleep(20 * time.Millisecond)
		}
	})

	t.Run("bpf nat list", func(t *testing.T) {
		// The lab runs without masquerade (its pods stay in the VPC): the view reads the
		// pinned tern_snat and prints an empty list, not null.
		var out, errb bytes.Buffer
		if code := ternctlOn(ctx, n, &out, &errb, "bpf", "nat", "list", "-o", "json"); code != 0 {
			t.Fatalf("exit %d: %s", code, errb.String())
		}
		var nat []ternctl.NATEntry
		if err := json.Unmarshal(out.Bytes(), &nat); err != nil || nat == nil {
			t.Fatalf("bpf nat list -o json: %v\n%s", err, out.String())
		}
	})

	// The map views need no agent; the agent's own commands say it is down with exit 3.
	if err := n.StopAgent(); err != nil {
		t.Fatal(err)
	}
	if svcs := ternctlJSON[[]ternctl.Service](t, ctx, n, "service", "list"); len(svcs) == 0 {
		t.Error("service list is empty with the agent stopped")
	}
	if flows := ternctlJSON[[]ternctl.Flow](t, ctx, n, "bpf", "ct", "list", "--address", client.IP.String()); len(flows) == 0 {
		t.Error("bpf ct list --address shows no flow of the client with the agent stopped")
	}
	v := ternctlJSON[api.PolicyView](t, ctx, n, "bpf", "policy", "get", backendAddr)
	if len(v.Policies) != 1 || v.Policies[0].Name != policyName || v.Policies[0].Counters.Ingress.DeniedPackets == 0 {
		t.Errorf("bpf policy get %s with the agent stopped: %+v", backendAddr, v)
	}
	if bws := ternctlJSON[[]ternctl.Bandwidth](t, ctx, n, "bpf", "bandwidth", "list"); len(bws) != 1 || bws[0].EgressBitsPerSecond != 10_000_000 {
		t.Errorf("bpf bandwidth list with the agent stopped: %+v", bws)
	}
	for _, args := range [][]string{{"status"}, {"ipam", "show"}, {"bpf", "ct", "list", "--pod", ns + "/client"}, {"policy", "get", ns + "/web-0"}} {
		var out, errb bytes.Buffer
		if code := ternctlOn(ctx, n, &out, &errb, args...); code != ternctl.ExitAgentDown {
			t.Errorf("ternctl %s with the agent stopped: exit %d (%s), want %d", strings.Join(args, " "), code, errb.String(), ternctl.ExitAgentDown)
		}
	}
}

// startMonitor runs ternctl monitor with args on n (ternctlOn) until ctx ends or it exits; it
// returns once the monitor reads, with its stdout lines and its exit code.
func startMonitor(t *testing.T, ctx context.Context, n *lab.Node, args ...string) (<-chan string, <-chan int) {
	t.Helper()
	return ternctltest.StartMonitor(t, func(stdout, stderr io.Writer) int { return ternctlOn(ctx, n, stdout, stderr, args...) })
}

func ptrTo[T any](v T) *T { return &v }

// sendBadIPFrom sends, from the pod's eth0 through a packet socket, a UDP frame to dst whose
// IPv4 total length is shorter than its header: tern_from_pod drops it as drop_bad_ip.
func sendBadIPFrom(n *lab.Node, p *lab.Pod, hostVeth string, dst [4]byte) error {
	var hostMAC net.HardwareAddr
	if err := nsutil.Do(n.NS, func() error {
		l, err := netlink.LinkByName(hostVeth)
		if err == nil {
			hostMAC = l.Attrs().HardwareAddr
		}
		return err
	}); err != nil {
		return fmt.Errorf("host veth %s: %w", hostVeth, err)
	}
	src := p.IP.As4()
	return nsutil.Do(p.NS(), func() error {
		eth0, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		return testutil.SendShortIPv4(eth0.Attrs().Index, eth0.Attrs().HardwareAddr, hostMAC, src, dst)
	})
}
