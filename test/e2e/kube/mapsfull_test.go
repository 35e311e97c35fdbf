//go:build linux

package kube_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/ternctl"
	"github.com/tern-net/tern/test/lab"
)

// Map sizes of the map-full lab: small enough to fill in a second under the load.
const (
	smallServices = 8    // frontends: "kubernetes", the fixture's "echo" and 6 more fit
	smallFlows    = 1024 // conntrack entries: 512 service flows
	smallSNAT     = 64   // masquerade translations
	// NetworkPolicy ipBlock prefixes (the nodes' own addresses take a few)
	smallPolicyCIDRs = 256
)

// smallMapsLab brings up a lab of its own whose agents' maps are adjusted by tune, with the
// chaos fixture (echoService) in namespace ns; the small maps would break the suite's other
// tests, so it is not the suite's lab.
func smallMapsLab(t *testing.T, ns string, tune func(c *agent.Config)) (*lab.Lab, *lab.Pod, netip.AddrPort, context.Context) {
	t.Helper()
	getLab(t) // the suite's binaries and privilege checks
	l, err := lab.Up(context.Background(), lab.Options{Nodes: 2, Kubernetes: true, BinDir: current.bin,
		ENIConf:     lab.ENIConf{MinPoolSize: 2, MaxPoolSize: 6},
		AgentConfig: func(_ *lab.Node, c *agent.Config) { tune(c) }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range l.Nodes() {
				lines := logLinesSince(t, n.AgentLog(), 0, `"level":"warn"`, `"level":"error"`)
				if len(lines) > 20 {
					lines = lines[len(lines)-20:]
				}
				t.Logf("%s agent warnings (last 20):\n%s", n.Name, strings.Join(lines, "\n"))
			}
		}
		if err := l.Down(); err != nil {
			t.Errorf("lab down: %v", err)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	client, addr := echoService(t, ctx, l, ns)
	return l, client, addr, ctx
}

// TestConntrackFullUnderClusterIPTraffic runs the load on a lab whose conntrack table holds
// 1,024 entries (512 service flows): the stream of new connections keeps it full and the LRU
// evicts. The pressure metric must show it, no established flow may break (the active ones,
// nor an idle one whatever halves of it the LRU took), and a new connection that fails must
// be counted (ct_reply_lost: its entries were evicted before the backend's SYN-ACK).
func TestConntrackFullUnderClusterIPTraffic(t *testing.T) {
	const ns = "e2e-ctfull"
	l, client, addr, ctx := smallMapsLab(t, ns, func(c *agent.Config) { c.MaxFlows = smallFlows })
	node2, err := l.NodeByName("node-2") // the client's node: its maps hold the client's flows
	if err != nil {
		t.Fatal(err)
	}
	{
		// An idle flow through a Service with one backend, opened before the flood: the
		// LRU's oldest entry.
		relabelPod(t, ctx, l, l.Pod(ns, "echo-1"), "solo", "yes")
		solo := newClusterIP(t, ctx, l, ns, "solo", map[string]string{"solo": "yes"}, 7000)
		onEveryNode(t, l, solo, "TCP", []string{netip.AddrPortFrom(l.Pod(ns, "echo-1").IP, 7000).String()})
		// The idle flow's source port is outside the kernel's ephemeral range (32768-60999),
		// so no connection of the load reuses it. Otherwise the test also meets a limit of a
		// full LRU table (docs/architecture.md, "Collision"): a load connection from the same
		// client port to the other ClusterIP that picks the same backend has the idle flow's
		// wire tuple; tern moves such a flow to another source port only when it finds the
		// idle flow's REVNAT half, which the LRU may have taken, and then the backend's
		// kernel resets the idle connection (seen once in CI: both halves present afterwards,
		// the echo reset by the peer).
		idle, who := dialEcho(t, ctx, fixedPort{client, 20000}, solo.String())
		defer idle.c.Close()
		idle.echo(t, "before")
		idleFrom := netip.MustParseAddrPort(idle.c.LocalAddr().String())
		if svcHalf, revHalf := flowHalves(t, node2, idleFrom); !svcHalf || !revHalf {
			t.Fatalf("the idle flow %s → %s lacks conntrack entries on node-2 before the flood: SVC %v, REVNAT %v", idleFrom, solo, svcHalf, revHalf)
		}
		capacity := agentMetric(t, ctx, node2, "tern_datapath_map_capacity", `map="tern_conntrack"`)
		if capacity != smallFlows {
			t.Fatalf("tern_datapath_map_capacity{map=\"tern_conntrack\"} is %v, want the configured %d", capacity, smallFlows)
		}

		dropped := drops(t, ctx, node2)
		pods := []*lab.Pod{client, l.Pod(ns, "echo-1"), l.Pod(ns, "echo-2")}
		kernelBefore := make([]map[string]float64, len(pods))
		for i, p := range pods {
			kernelBefore[i] = tcpCounters(t, p)
		}
		replyLost := func() float64 {
			return agentMetric(t, ctx, node2, "tern_datapath_packets_total", `reason="ct_reply_lost"`)
		}
		lostBefore := replyLost()
		ld := startLoad(t, ctx, client, addr, 20)
		start := time.Now()
		// The dialer's closed connections stay in the table until the LRU evicts them: it
		// fills within a second. The pressure metric must show it full.
		full := 0.0
		eventually(t, 60*time.Second, "the conntrack table full (tern_datapath_map_entries at capacity)", func() (bool, string) {
			full = agentMetric(t, ctx, node2, "tern_datapath_map_entries", `map="tern_conntrack"`)
			return full >= 0.9*capacity, fmt.Sprintf("%v of %v entries", full, capacity)
		})
		// Well past one table's worth of new flows since: the idle flow's entry was evicted.
		ld.waitNewConns(t, time.Now(), 4*smallFlows, "new connections through the full table")
		svcHalf, revHalf := flowHalves(t, node2, idleFrom)
		r := ld.finish(start)
		// The idle flow's next packet: with both halves evicted it opens a new pair (one
		// backend: the same one); with only the REVNAT half evicted the client's packet
		// rebuilds it (svc_established looks it up on every packet); with only the SVC half
		// evicted the packet finds its backend through the REVNAT half. In every case the
		// echo comes back. Which halves went is up to the kernel: logged, not asserted (its
		// LRU protects an entry looked up since it was last rotated, so an idle flow
		// survived 4,096 new ones in some runs).
		idleErr := echoErr(idle, "after")
		lost := replyLost() - lostBefore
		lostBy := agentSamples(t, ctx, node2, "tern_datapath_packets_total", `reason="ct_reply_lost"`)
		kernel := map[string]map[string]float64{}
		for i, p := range pods {
			kernel[p.Name] = countersSince(tcpCounters(t, p), kernelBefore[i])
		}
		t.Logf("conntrack (%v entries): %v of them in use under the load; the idle flow %s (to %s, %s) kept its SVC half %v, its REVNAT half %v; its next echo: %v; %v; handshake replies that found no entry (ct_reply_lost): %v (since the lab started, by direction: %v); node-2's drops meanwhile: %v; the pods' kernel TCP counters meanwhile: %v",
			capacity, full, idleFrom, solo, who, svcHalf, revHalf, idleErr, r, lost, lostBy, dropsSince(t, ctx, node2, dropped), kernel)
		if idleErr != nil {
			t.Errorf("the idle established flow %s (SVC half kept %v, REVNAT half kept %v) broke on its next echo: %v", idleFrom, svcHalf, revHalf, idleErr)
		}
		// Every failed new connection must be counted. The LRU can recycle a flow's REVNAT
		// half before a reply of the backend (rare since new entries are created referenced,
		// conntrack.h ct_create): the SYN-ACK, or the greeting right after the handshake.
		// That reply reaches the client untranslated; the client's kernel answers it with a
		// RST (its OutRsts), which ends the server's side (AttemptFails for a half-open
		// connection, EstabResets for an established one), and the dial or the greeting
		// read fails with no segment retransmitted anywhere. The datapath counts each such
		// reply as ct_reply_lost: to-pod when it comes through the stack (echo-1, on
		// node-1), from-pod when it leaves echo-2 for the client on the same node
		// (bpf_redirect_peer skips the client's to-pod hook). Before, only SYN-ACKs entering
		// through to-pod were counted: a lost greeting, or any reply of echo-2, failed a
		// connection with nothing counted (the OPEN failures of 2026-12-03).
		if float64(r.Failed) > lost {
			t.Errorf("%d new connections failed under conntrack pressure and %v ct_reply_lost were counted: a failure nothing explains (first: %v)", r.Failed, lost, r.FailedHow)
		}
		// The servers' kernels reset connections only on such a RST, and lose no SYN at
		// their listen queues (one dialer: one connection at a time waits for accept).
		resets := 0.0
		for _, p := range pods[1:] {
			k := kernel[p.Name]
			resets += k["AttemptFails"] + k["EstabResets"]
			if k["ListenOverflows"]+k["ListenDrops"] > 0 {
				t.Errorf("%s's kernel dropped SYNs at its listen queue: %v", p.Name, k)
			}
		}
		if resets > lost {
			t.Errorf("the servers' kernels had %v connections reset and the datapath counted %v ct_reply_lost: a lost reply not counted", resets, lost)
		}
		requireNoBrokenFlows(t, r)
	}
}

// TestServiceAndNATMapsFullUnderClusterIPTraffic fills the service map (8 frontends), the
// masquerade NAT table (64 translations) and the NetworkPolicy prefix map (256) of a lab of
// its own, one after the other, while the load runs:
// each full map must be counted and surfaced, the Services that fit keep being served, and
// the node recovers without help once there is room.
func TestServiceAndNATMapsFullUnderClusterIPTraffic(t *testing.T) {
	const ns = "e2e-mapsfull"
	l, client, addr, ctx := smallMapsLab(t, ns, func(c *agent.Config) {
		c.MaxServices, c.MaxPolicyCIDRs = smallServices, smallPolicyCIDRs
		c.Masquerade = agent.MasqueradeConfig{Enabled: true, VPCCIDRs: []string{"192.168.0.0/16"}, MaxFlows: smallSNAT,
			GCInterval: agent.Duration(time.Second)}
	})
	node2, err := l.NodeByName("node-2")
	if err != nil {
		t.Fatal(err)
	}

	t.Run("service map", func(t *testing.T) {
		capacity := agentMetric(t, ctx, node2, "tern_datapath_map_capacity", `map="tern_services"`)
		if capacity != smallServices {
			t.Fatalf("tern_datapath_map_capacity{map=\"tern_services\"} is %v, want the configured %d", capacity, smallServices)
		}
		errorsBefore := map[string]float64{}
		for _, n := range l.Nodes() {
			errorsBefore[n.Name] = agentMetric(t, ctx, n, "tern_service_syncs_total", `result="error"`)
		}
		ld := startLoad(t, ctx, client, addr, 20)
		start := time.Now()
		// Fill the map one Service at a time (each in every node's maps before the next).
		var fills []string
		backends := []string{netip.AddrPortFrom(l.Pod(ns, "echo-1").IP, 7000).String(), netip.AddrPortFrom(l.Pod(ns, "echo-2").IP, 7000).String()}
		for i := 0; ; i++ {
			in := agentMetric(t, ctx, node2, "tern_datapath_map_entries", `map="tern_services"`)
			if in >= capacity {
				break
			}
			name := fmt.Sprintf("fill-%d", i)
			front := newClusterIP(t, ctx, l, ns, name, map[string]string{"app": "echo"}, int32(7200+i))
			onEveryNode(t, l, front, "TCP", backends)
			fills = append(fills, name)
		}
		over := newClusterIP(t, ctx, l, ns, "overflow", map[string]string{"app": "echo"}, 7300)
		overAt := time.Now()
		// Each node's agent says so on the Service, and counts the failed sync.
		for _, n := range l.Nodes() {
			eventually(t, 60*time.Second, "a TernLoadBalancerMapFull Event from "+n.Name, func() (bool, string) {
				evs, err := l.Client().CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=overflow"})
				if err != nil {
					return false, err.Error()
				}
				for _, e := range evs.Items {
					if e.Type == corev1.EventTypeWarning && e.Reason == "TernLoadBalancerMapFull" && e.Source.Host == n.Name {
						t.Logf("Event from %s: %s", n.Name, e.Message)
						return true, ""
					}
				}
				return false, fmt.Sprintf("%d events", len(evs.Items))
			})
			if d := agentMetric(t, ctx, n, "tern_service_syncs_total", `result="error"`) - errorsBefore[n.Name]; d == 0 {
				t.Errorf("%s: tern_service_syncs_total{result=\"error\"} did not rise for the Service that did not fit", n.Name)
			}
			if _, ok := backendsOn(t, n, over, "TCP"); ok {
				t.Errorf("%s serves %s although its map was full", n.Name, over)
			}
		}
		// The others keep being served, and the one that did not fit gets in once there is
		// room, without help (the controller retries).
		if err := l.Client().CoreV1().Services(ns).Delete(ctx, fills[len(fills)-1], metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		freed := time.Now()
		onEveryNode(t, l, over, "TCP", backends)
		served := time.Now()
		if who, err := client.Ask(ctx, over.String(), "in"); err != nil || !strings.HasPrefix(who, ns+"/echo-") {
			t.Fatalf("the Service that did not fit, once there was room: %q, %v", who, err)
		}
		ld.waitNewConns(t, served, 20, "new connections after the map had room again")
		r := ld.finish(start)
		t.Logf("service map (%v frontends) filled by %d Services, one more refused with an Event on each node; served %v after one was deleted (%v after it was created); %v",
			capacity, len(fills), served.Sub(freed).Round(time.Millisecond), served.Sub(overAt).Round(time.Millisecond), r)
		requireNoBrokenFlows(t, r)
		if r.Failed > 0 {
			t.Errorf("%d new connections through %s failed while the service map was full", r.Failed, addr)
		}
		for _, name := range fills[:len(fills)-1] {
			_ = l.Client().CoreV1().Services(ns).Delete(ctx, name, metav1.DeleteOptions{})
		}
	})

	t.Run("masquerade NAT table", func(t *testing.T) {
		capacity := agentMetric(t, ctx, node2, "tern_datapath_map_capacity", `map="tern_snat"`)
		if capacity != smallSNAT {
			t.Fatalf("tern_datapath_map_capacity{map=\"tern_snat\"} is %v, want the configured %d", capacity, smallSNAT)
		}
		full := func() float64 {
			return agentMetric(t, ctx, node2, "tern_datapath_packets_total", `reason="drop_snat_full"`)
		}
		fullBefore := full()
		ld := startLoad(t, ctx, client, addr, 20)
		start := time.Now()
		// New flows from the client pod to an address outside the VPC (TEST-NET-3, which
		// nothing in the lab answers: the VPC router has no route there) are masqueraded;
		// each SYN claims a translation, kept for the SYN lifetime (60 s). Twice the table.
		outside := netip.MustParseAddrPort("203.0.113.10:80")
		var wg sync.WaitGroup
		for w := range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < 2*smallSNAT; i += 16 {
					dctx, dcancel := context.WithTimeout(ctx, 50*time.Millisecond)
					if c, err := client.Dial(dctx, outside.String()); err == nil {
						c.Close()
					}
					dcancel()
				}
			}()
		}
		wg.Wait()
		entries := 0.0
		eventually(t, 30*time.Second, "tern_snat full and drop_snat_full counted", func() (bool, string) {
			entries = agentMetric(t, ctx, node2, "tern_datapath_map_entries", `map="tern_snat"`)
			return entries >= capacity && full() > fullBefore, fmt.Sprintf("%v of %v entries, %v drop_snat_full", entries, capacity, full()-fullBefore)
		})
		filled := time.Now()
		dropped := full() - fullBefore
		// Recovery without help: the SYN lifetime passes, the agent's NAT GC (1 s here)
		// deletes the expired translations, and a new masqueraded flow gets one again.
		eventually(t, 90*time.Second, "tern_snat emptied by the agent's GC", func() (bool, string) {
			entries = agentMetric(t, ctx, node2, "tern_datapath_map_entries", `map="tern_snat"`)
			return entries < capacity/2, fmt.Sprintf("%v of %v entries", entries, capacity)
		})
		emptied := time.Now()
		before := full()
		dctx, dcancel := context.WithTimeout(ctx, 50*time.Millisecond)
		if c, err := client.Dial(dctx, outside.String()); err == nil {
			c.Close()
		}
		dcancel()
		if d := full() - before; d != 0 {
			t.Errorf("a new masqueraded flow after the GC was still dropped as drop_snat_full (%v)", d)
		}
		ld.waitNewConns(t, emptied, 20, "new connections after the NAT table emptied")
		r := ld.finish(start)
		t.Logf("masquerade NAT table (%v entries) filled in %v by %d flows to %s: %v new flows dropped as drop_snat_full; emptied by the agent's GC %v after it filled; %v",
			capacity, filled.Sub(start).Round(time.Millisecond), 2*smallSNAT, outside, dropped, emptied.Sub(filled).Round(time.Millisecond), r)
		requireNoBrokenFlows(t, r)
		if r.Failed > 0 {
			t.Errorf("%d new connections through %s failed while the NAT table was full (Service traffic inside the VPC is never masqueraded)", r.Failed, addr)
		}
	})

	t.Run("policy maps", func(t *testing.T) {
		// tern_policy_cidrs holds smallPolicyCIDRs prefixes here. A pod on node-2 is allowed to
		// reach echo-1 only; then policies with more ipBlocks than that select it.
		const cidrCapacity, perPolicy, policies = smallPolicyCIDRs, 100, 3
		guarded, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "guarded", Node: "node-2", Labels: map[string]string{"role": "guarded"}})
		if err != nil {
			t.Fatal(err)
		}
		echo1, echo2 := netip.AddrPortFrom(l.Pod(ns, "echo-1").IP, 7000), netip.AddrPortFrom(l.Pod(ns, "echo-2").IP, 7000)
		np := func(name string, cidrs []string) *networkingv1.NetworkPolicy {
			var peers []networkingv1.NetworkPolicyPeer
			for _, c := range cidrs {
				peers = append(peers, networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: c}})
			}
			return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: name},
				Spec: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"role": "guarded"}},
					PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
					Egress:      []networkingv1.NetworkPolicyEgressRule{{To: peers}}}}
		}
		nps := l.Client().NetworkingV1().NetworkPolicies(ns)
		if _, err := nps.Create(ctx, np("only-echo-1", []string{echo1.Addr().String() + "/32"}), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		eventually(t, 60*time.Second, "the policy in force: guarded reaches echo-1, not echo-2", func() (bool, string) {
			a, b := reaches(ctx, guarded, echo1.String()), reaches(ctx, guarded, echo2.String())
			return a && !b, fmt.Sprintf("echo-1 %v, echo-2 %v", a, b)
		})
		failures := agentMetric(t, ctx, node2, "tern_networkpolicy_sync_failures_total", `reason="map_full"`)
		ld := startLoad(t, ctx, client, addr, 20)
		start := time.Now()
		for i := range policies {
			cidrs := make([]string, perPolicy)
			for j := range cidrs {
				n := i*perPolicy + j
				cidrs[j] = fmt.Sprintf("10.200.%d.%d/32", n/256, n%256)
			}
			if _, err := nps.Create(ctx, np(fmt.Sprintf("big-%02d", i), cidrs), metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		eventually(t, 90*time.Second, "a TernNetworkPolicyMapFull Event on node-2 and the failure counted", func() (bool, string) {
			got := agentMetric(t, ctx, node2, "tern_networkpolicy_sync_failures_total", `reason="map_full"`) - failures
			evs, err := l.Client().CoreV1().Events("default").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=node-2,reason=TernNetworkPolicyMapFull"})
			if err != nil {
				return false, err.Error()
			}
			if got > 0 && len(evs.Items) > 0 {
				t.Logf("Event on node-2: %.300s", evs.Items[0].Message)
				return true, ""
			}
			return false, fmt.Sprintf("%v failures counted, %d events", got, len(evs.Items))
		})
		filled := time.Now()
		// The previous rules stay enforced.
		if a, b := reaches(ctx, guarded, echo1.String()), reaches(ctx, guarded, echo2.String()); !a || b {
			t.Errorf("with the policy maps full the previous policy no longer holds: guarded reaches echo-1 %v (want true), echo-2 %v (want false)", a, b)
		}
		// Room again: the big policies go, and a change after that is enforced.
		for i := range policies {
			if err := nps.Delete(ctx, fmt.Sprintf("big-%02d", i), metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		freed := time.Now()
		if _, err := nps.Create(ctx, np("also-echo-2", []string{echo2.Addr().String() + "/32"}), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		eventually(t, 90*time.Second, "a policy change enforced after the big policies went", func() (bool, string) {
			b := reaches(ctx, guarded, echo2.String())
			return b, fmt.Sprintf("guarded reaches echo-2: %v", b)
		})
		recovered := time.Now()
		ld.waitNewConns(t, recovered, 20, "new connections after the policy maps had room")
		r := ld.finish(start)
		t.Logf("policy maps: %d ipBlocks for a %d-prefix tern_policy_cidrs, refused %v after the first was created; previous rules kept; a change enforced %v after the big policies were deleted; %v",
			policies*perPolicy, cidrCapacity, filled.Sub(start).Round(time.Millisecond), recovered.Sub(freed).Round(time.Millisecond), r)
		requireNoBrokenFlows(t, r)
		if r.Failed > 0 {
			t.Errorf("%d new connections through %s failed while the policy maps were full", r.Failed, addr)
		}
	})
}

// newClusterIP makes a ClusterIP Service with one TCP port (targetPort "serve").
func newClusterIP(t *testing.T, ctx context.Context, l *lab.Lab, ns, name string, selector map[string]string, port int32) netip.AddrPort {
	t.Helper()
	svc, err := l.Client().CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{Selector: selector, Ports: []corev1.ServicePort{
			{Port: port, TargetPort: intstr.FromString("serve"), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), uint16(port))
}

// hasServiceFlow reports whether the node's conntrack has the service entry of the flow
// from the client's address and port.
func hasServiceFlow(t *testing.T, n *lab.Node, from netip.AddrPort) bool {
	t.Helper()
	svc, _ := flowHalves(t, n, from)
	return svc
}

// flowHalves reports which entries of the service flow from the client's address and port
// the node's conntrack holds: the SVC entry (client → frontend) and the REVNAT entry (its
// translated tuple, which replies are found by).
func flowHalves(t *testing.T, n *lab.Node, from netip.AddrPort) (svc, revnat bool) {
	t.Helper()
	m, err := loader.OpenPinnedMaps(n.PinRoot())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	flows, err := ternctl.ReadFlows(m)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range flows {
		switch {
		case f.Kind == "service" && f.From == from:
			svc = true
		case f.Kind == "revnat" && (f.From == from || f.To == from):
			revnat = true
		}
	}
	return svc, revnat
}

// fixedPort dials from a pod with a chosen source port.
type fixedPort struct {
	p    *lab.Pod
	port int
}

func (f fixedPort) Dial(ctx context.Context, addr string) (net.Conn, error) {
	return f.p.DialFrom(ctx, addr, f.port)
}

// echoErr is echoConn.echo returning the error instead of failing.
func echoErr(e *echoConn, msg string) error {
	e.c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(e.c, "%s\n", msg); err != nil {
		return err
	}
	got, err := e.r.ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(got) != msg {
		return fmt.Errorf("echo of %q came back as %q", msg, got)
	}
	return nil
}

// tcpCounters is the pod's kernel TCP counters that say where a connection is lost: Tcp's
// AttemptFails, EstabResets, RetransSegs, OutRsts, and TcpExt's ListenOverflows, ListenDrops,
// TCPSynRetrans, TCPTimeWaitOverflow, TCPReqQFullDrop (/proc/net/snmp and netstat, read in
// its network namespace, as nstat does).
func tcpCounters(t *testing.T, p *lab.Pod) map[string]float64 {
	t.Helper()
	want := map[string]bool{"AttemptFails": true, "RetransSegs": true, "OutRsts": true, "ListenOverflows": true,
		"ListenDrops": true, "TCPSynRetrans": true, "TCPTimeWaitOverflow": true, "TCPReqQFullDrop": true,
		"EstabResets": true}
	out := map[string]float64{}
	err := p.Exec(func() error {
		for _, f := range []string{"/proc/thread-self/net/snmp", "/proc/thread-self/net/netstat"} {
			b, err := os.ReadFile(f)
			if err != nil {
				return err
			}
			lines := strings.Split(string(b), "\n")
			// Pairs of lines: "Prefix: names..." then "Prefix: values...".
			for i := 0; i+1 < len(lines); i += 2 {
				names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
				if len(names) != len(values) || len(names) == 0 || (names[0] != "Tcp:" && names[0] != "TcpExt:") {
					continue
				}
				for j := 1; j < len(names); j++ {
					if want[names[j]] {
						v, err := strconv.ParseFloat(values[j], 64)
						if err != nil {
							return fmt.Errorf("%s: %s %q: %w", f, names[j], values[j], err)
						}
						out[names[j]] = v
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%s's TCP counters: %v", p.Name, err)
	}
	return out
}

// countersSince is what counters rose by since before (only those that moved).
func countersSince(now, before map[string]float64) map[string]float64 {
	out := map[string]float64{}
	for k, v := range now {
		if d := v - before[k]; d != 0 {
			out[k] = d
		}
	}
	return out
}
