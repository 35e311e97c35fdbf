//go:build linux

package kube_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/test/k8s/kubeletsim"
	"github.com/tern-net/tern/test/lab"
)

// TestNodeNamespaceDeletedUnderClusterIPTraffic is a node's VM dying and coming back under the
// same instance, while a client pod on the other node drives a ClusterIP whose backends are on
// both: node-1's agent is killed with SIGKILL, its pods die and its network namespace is
// deleted (every link in it with it), then — as the node lifecycle controller would — its pods
// are marked not ready and deleted; then the node boots again with a new disk (lab.Node.Boot
// with WipeDisk: the cloud plugs its ENIs into a fresh namespace) and its agent starts.
//
// It asserts: the surviving node keeps serving (no established flow to its own backends
// breaks; every flow to the dead node's backends does, counted); once the dead pods are not
// ready the client's node stops choosing them (timed) and no new connection fails after; the
// new agent recovers the instance's ENIs from the cloud — the same ENIs, no new one, none
// leaked, no address given twice (lab.CheckCloudMatchesAgents) — and says so in its log and
// metrics; new pods on the node get addresses and answer through the ClusterIP. Then the VM
// dies again and reboots with its disk: the store's allocations of the dead pods are held
// (a new pod gets another address) until the agent's pod GC releases them, and nothing is
// adopted. The test has a lab of its own: the suite's other tests use the shared lab's node-1.
func TestNodeNamespaceDeletedUnderClusterIPTraffic(t *testing.T) {
	bin := binaries(t)
	// 12 idle addresses at least: two secondary ENIs per node (10 addresses each).
	l, err := lab.Up(context.Background(), lab.Options{Nodes: 2, Kubernetes: true, BinDir: bin,
		ENIConf: lab.ENIConf{MinPoolSize: 12, MaxPoolSize: 16}})
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
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const ns = "e2e-nodegone"
	dead, survivor := l.Node(0), l.Node(1)
	app := map[string]string{"app": "echo"}
	for _, p := range []lab.PodSpec{
		{Namespace: ns, Name: "echo-1a", Node: dead.Name, Labels: app, ServePort: 7000},
		{Namespace: ns, Name: "echo-1b", Node: dead.Name, Labels: app, ServePort: 7000},
		{Namespace: ns, Name: "echo-2a", Node: survivor.Name, Labels: app, ServePort: 7000},
		{Namespace: ns, Name: "echo-2b", Node: survivor.Name, Labels: app, ServePort: 7000},
		{Namespace: ns, Name: "client", Node: survivor.Name},
	} {
		if _, err := l.RunPod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	client := l.Pod(ns, "client")
	svc, err := l.Client().CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: corev1.ServiceSpec{Selector: app, Ports: []corev1.ServicePort{
			{Port: 7000, TargetPort: intstr.FromString("serve"), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 7000)
	backend := func(names ...string) []string {
		var out []string
		for _, n := range names {
			out = append(out, netip.AddrPortFrom(l.Pod(ns, n).IP, 7000).String())
		}
		return out
	}
	survivors := backend("echo-2a", "echo-2b")
	onEveryNode(t, l, addr, "TCP", backend("echo-1a", "echo-1b", "echo-2a", "echo-2b"))

	// What the cloud holds for the node before it dies: its pool's ENIs and their addresses.
	enisBefore := nodeENIs(l, dead.Name)
	if len(enisBefore) < 2 {
		t.Fatalf("node-1 holds %d secondary ENIs before the crash (%v), want at least 2", len(enisBefore), enisBefore)
	}

	ld := startNodeLossLoad(t, ctx, client, addr, 20)
	onDead := ld.flowsTo(ns + "/echo-1")
	if len(onDead) == 0 || len(onDead) == len(ld.flows) {
		t.Fatalf("%d of %d flows reach node-1's backends: the test needs flows on both nodes", len(onDead), len(ld.flows))
	}

	countersFrom := time.Now()
	icmpBefore, tcpBefore := icmpUnreachables(t, client), tcpCounters(t, client)
	dpBefore := agentSamples(t, ctx, survivor, "tern_datapath_packets_total")
	crashed := time.Now()
	deadPods, err := dead.Crash()
	if err != nil {
		t.Fatal(err)
	}
	nsGone := time.Now()
	// What an operator's monitoring sees first: the node's agent stops answering (its socket
	// and /metrics are gone with it).
	if _, err := dead.Client().Status(ctx); err == nil {
		t.Fatalf("node-1's agent still answers after its VM died")
	}
	// Every flow to the dead node's backends breaks (an echo times out: 5 s); none other.
	eventually(t, 30*time.Second, "every flow to node-1's backends broken", func() (bool, string) {
		b := ld.brokenFlows(onDead)
		return len(b) == len(onDead), fmt.Sprintf("%d of %d broken", len(b), len(onDead))
	})
	// New connections meanwhile: those the client's node sends to a dead backend fail.
	ld.waitDials(t, crashed, func(d lossDial) bool { return !d.ok() }, 5, "new connections to the dead backends failing")
	ld.waitDials(t, crashed, lossDial.ok, 20, "new connections to the surviving backends")

	// The node lifecycle controller's part: the dead node's pods are marked not ready (their
	// endpoints stop being ready), then deleted.
	notReady := time.Now()
	for _, p := range deadPods {
		if err := l.SetPodReady(ctx, p, false); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 60*time.Second, "the client's node choosing only the surviving backends", func() (bool, string) {
		got, _ := backendsOn(t, survivor, addr, "TCP")
		return slices.Equal(got, survivors), fmt.Sprintf("backends %v", got)
	})
	dropped := time.Now()
	// What the client's kernel was told: ICMP destination unreachable (the emulated VPC
	// router's, once the dead node's links are gone and with them its routes to the dead
	// pods' addresses), and the TCP counters.
	icmpSeen, tcpSeen := icmpUnreachables(t, client)-icmpBefore, countersSince(tcpCounters(t, client), tcpBefore)
	dpSeen := countersSince(agentSamples(t, ctx, survivor, "tern_datapath_packets_total"), dpBefore)
	ld.waitDials(t, dropped, lossDial.ok, 50, "new connections after the dead backends were dropped")
	for _, p := range deadPods {
		if err := kubeletsim.DeletePod(ctx, l.Client(), p.Namespace, p.Name); err != nil {
			t.Fatal(err)
		}
	}

	// The VM comes back with a new disk under the same instance; the DaemonSet starts the agent.
	booted := time.Now()
	replugged, err := dead.Boot(lab.BootOptions{WipeDisk: true})
	if err != nil {
		t.Fatal(err)
	}
	plugged := time.Now()
	for id := range enisBefore {
		if !slices.Contains(replugged, id) {
			t.Fatalf("the cloud did not plug ENI %s into the rebooted node (plugged %v)", id, replugged)
		}
	}
	logFrom := fileSize(t, dead.AgentLog())
	if err := dead.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	agentReady := time.Now()
	// The agent recovers the instance's ENIs: cloud and agent agree, with the same ENIs.
	var lastCheck error
	eventually(t, 90*time.Second, "cloud and agents agreeing after the reboot", func() (bool, string) {
		lastCheck = l.CheckCloudMatchesAgents(ctx)
		return lastCheck == nil, fmt.Sprint(lastCheck)
	})
	agreed := time.Now()
	enisAfter := nodeENIs(l, dead.Name)
	for id := range enisBefore {
		if _, ok := enisAfter[id]; !ok {
			t.Errorf("ENI %s of node-1 before the crash is not the node's after it (after: %v)", id, keys(enisAfter))
		}
	}
	for id := range enisAfter {
		if _, ok := enisBefore[id]; !ok {
			t.Errorf("node-1 has a new ENI %s after the reboot: it created one instead of recovering its own %v", id, keys(enisBefore))
		}
	}
	// Surfaced: the new agent counts and logs each ENI it found in the cloud and not on its
	// (new) disk, and says its store was empty.
	if n := agentMetric(t, ctx, dead, "tern_ipam_cloud_disagreements_total", `action="adopted_eni"`); n != float64(len(enisBefore)) {
		t.Errorf("the new agent counted %v adopted ENIs (tern_ipam_cloud_disagreements_total), want %d", n, len(enisBefore))
	}
	if l := logLinesSince(t, dead.AgentLog(), logFrom, "the IPAM store was empty: recovered the node's ENIs from the cloud"); len(l) != 1 {
		t.Errorf("the new agent logged %d lines about recovering from an empty store, want 1: %v", len(l), l)
	}
	adopted := logLinesSince(t, dead.AgentLog(), logFrom, "adopted an ENI of this node the pool did not know")
	for id := range enisBefore {
		found := false
		for _, line := range adopted {
			found = found || strings.Contains(line, id)
		}
		if !found {
			t.Errorf("the new agent did not log recovering ENI %s (logged: %v)", id, adopted)
		}
	}

	// New pods on the node get addresses and answer through the ClusterIP.
	for _, name := range []string{"echo-1c", "echo-1d"} {
		if _, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: name, Node: dead.Name, Labels: app, ServePort: 7000}); err != nil {
			t.Fatal(err)
		}
	}
	podsUp := time.Now()
	onEveryNode(t, l, addr, "TCP", backend("echo-1c", "echo-1d", "echo-2a", "echo-2b"))
	served := time.Now()
	seen := map[string]int{}
	for i := 0; i < 200 && (seen[ns+"/echo-1c"] == 0 || seen[ns+"/echo-1d"] == 0); i++ {
		who, err := client.Ask(ctx, addr.String(), "after")
		if err != nil {
			t.Fatalf("through the ClusterIP after the reboot: %v", err)
		}
		seen[who]++
	}
	if seen[ns+"/echo-1c"] == 0 || seen[ns+"/echo-1d"] == 0 {
		t.Fatalf("the new pods on node-1 did not answer through the ClusterIP in 200 connections: %v", seen)
	}
	if err := l.CheckCloudMatchesAgents(ctx); err != nil {
		t.Fatalf("after the new pods: %v", err)
	}

	r := ld.finish(crashed, ns+"/echo-1")
	t.Logf("node-1's namespace gone %v after the kill; flows: %d to node-2's backends, %d echoes, %d broken; %d to node-1's, all broken within %v",
		nsGone.Sub(crashed).Round(time.Millisecond), len(ld.flows)-len(onDead), r.liveEchoes, r.liveBroken, len(onDead), r.deadBrokenWithin.Round(time.Millisecond))
	t.Logf("new connections from the kill until the dead backends were dropped: %d ok, %d failed (first: %v); after: %d ok, %d failed; the client pod received %v ICMP destination unreachable meanwhile, TCP counters moved %v; node-2's datapath counted %v",
		r.okBetween(crashed, dropped), r.failedBetween(crashed, dropped), r.firstFailures(crashed, dropped, 3), r.okBetween(dropped, time.Now()), r.failedBetween(dropped, time.Now()),
		icmpSeen, tcpSeen, dpSeen)
	t.Logf("pods marked not ready → the client's node chose only the survivors in %v; reboot: ENIs replugged in %v, agent ready %v after, cloud and agents agreed %v after that (%d ENIs recovered: %v); 2 new pods up %v after, in the maps %v later",
		dropped.Sub(notReady).Round(time.Millisecond), plugged.Sub(booted).Round(time.Millisecond), agentReady.Sub(plugged).Round(time.Millisecond),
		agreed.Sub(agentReady).Round(time.Millisecond), len(enisBefore), keys(enisBefore), podsUp.Sub(agreed).Round(time.Millisecond), served.Sub(podsUp).Round(time.Millisecond))
	// A dead node answers nothing: a new connection to one of its backends is never refused
	// (a RST could only come from a kernel still alive behind the node's ENIs: before Crash
	// silenced the node first, the dead pods' kernels answered one from their closed
	// listeners for the milliseconds their namespaces took to go; docs/reliability.md). It
	// times out, or fails on an ICMP error the client's kernel matched to its socket. Every
	// refused or unreachable dial is one failed attempt in the client's kernel
	// (AttemptFails counts a SYN_SENT socket a RST or an ICMP error ends, not one its owner
	// closed after a timeout).
	refused, unreachable, other := r.failureKinds(countersFrom, dropped)
	if n := r.refusedAfter(crashed); len(n) > 0 {
		t.Errorf("%d new connections were refused after node-1 died (first: %v): a dead node answers nothing; who sent the RST?", len(n), n[:min(3, len(n))])
	}
	if got := tcpSeen["AttemptFails"]; got != float64(refused+unreachable) {
		t.Errorf("the client's kernel counted %v failed connection attempts, but %d dials were refused and %d unreachable (%d failed otherwise: timed out or reset after the handshake): a connect failed by something else", got, refused, unreachable, other)
	}
	t.Logf("failed new connections until the dead backends were dropped: %d refused, %d unreachable, %d otherwise (timed out, or reset after the handshake)", refused, unreachable, other)
	if r.liveBroken > 0 {
		t.Errorf("%d flows to node-2's own backends broke: the surviving node must keep serving them (%v)", r.liveBroken, r.broken)
	}
	if n := r.failedBetween(dropped, time.Now()); n > 0 {
		t.Errorf("%d new connections failed after the client's node dropped the dead backends (first: %v)", n, r.firstFailures(dropped, time.Now(), 3))
	}
	if t.Failed() {
		return
	}

	// Again, and this time the VM reboots with its disk (a host failure: the instance starts
	// again with its disks). The store still holds the dead pods' allocations: the new agent
	// must keep their addresses from new pods until the pods are gone from the apiserver, then
	// release them (its pod GC: two passes a minute apart), and must adopt nothing — the store
	// knows the node's ENIs.
	enisBefore = nodeENIs(l, dead.Name)
	deadPods, err = dead.Crash()
	if err != nil {
		t.Fatal(err)
	}
	deadIPs := map[string]string{}
	deleted2 := time.Now()
	for _, p := range deadPods {
		deadIPs[p.Namespace+"/"+p.Name+"/"] = p.IP.String()
		if err := kubeletsim.DeletePod(ctx, l.Client(), p.Namespace, p.Name); err != nil {
			t.Fatal(err)
		}
	}
	// The dead node's maps are gone with it: only the client's node is checked.
	survivorChooses := func(want []string) {
		slices.Sort(want)
		eventually(t, 60*time.Second, "the client's node choosing "+fmt.Sprint(want), func() (bool, string) {
			got, _ := backendsOn(t, survivor, addr, "TCP")
			return slices.Equal(got, want), fmt.Sprintf("backends %v", got)
		})
	}
	survivorChooses(survivors)
	deletedDropped := time.Since(deleted2)
	if _, err := dead.Boot(lab.BootOptions{}); err != nil {
		t.Fatal(err)
	}
	logFrom = fileSize(t, dead.AgentLog())
	rebooted := time.Now()
	if err := dead.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	ready2 := time.Now()
	held := func() map[string]string {
		st, err := dead.Client().State(ctx)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for k, a := range st.Allocations {
			for prefix := range deadIPs {
				if strings.HasPrefix(k, prefix) {
					out[k] = a.IP
				}
			}
		}
		return out
	}
	if h := held(); len(h) != len(deadPods) {
		t.Fatalf("after a reboot with its disk the agent holds %v for the %d dead pods, want each pod's allocation kept until the pod is gone", h, len(deadPods))
	}
	if _, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "echo-1e", Node: dead.Name, Labels: app, ServePort: 7000}); err != nil {
		t.Fatal(err)
	}
	for k, ip := range deadIPs {
		if l.Pod(ns, "echo-1e").IP.String() == ip {
			t.Fatalf("the new pod got %s, still held for the dead pod %s", ip, k)
		}
	}
	survivorChooses(backend("echo-1e", "echo-2a", "echo-2b"))
	if who, err := client.Ask(ctx, netip.AddrPortFrom(l.Pod(ns, "echo-1e").IP, 7000).String(), "direct"); err != nil || who != ns+"/echo-1e" {
		t.Fatalf("the new pod on the rebooted node from the client: %q, %v", who, err)
	}
	eventually(t, 150*time.Second, "the dead pods' addresses released by the agent's pod GC", func() (bool, string) {
		h := held()
		return len(h) == 0, fmt.Sprintf("still held: %v", h)
	})
	released := time.Now()
	if err := l.CheckCloudMatchesAgents(ctx); err != nil {
		t.Fatalf("after the reboot with the disk: %v", err)
	}
	if n := agentMetric(t, ctx, dead, "tern_ipam_cloud_disagreements_total"); n != 0 {
		t.Errorf("the agent acted on %v disagreements with the cloud after a reboot with its store: it must have known its ENIs", n)
	}
	if got := nodeENIs(l, dead.Name); !slices.Equal(keys(got), keys(enisBefore)) {
		t.Errorf("node-1's ENIs changed across the reboot: %v, before %v", keys(got), keys(enisBefore))
	}
	gcLines := logLinesSince(t, dead.AgentLog(), logFrom, "released addresses of deleted pods")
	t.Logf("second crash: the dead pods deleted → the client's node chose only the survivors in %v; reboot with the disk: agent ready %v after the boot; the dead pods' %d addresses held, then released by pod GC %v after the agent was ready (logged: %s)",
		deletedDropped.Round(time.Millisecond), ready2.Sub(rebooted).Round(time.Millisecond), len(deadIPs), released.Sub(ready2).Round(time.Millisecond), first(gcLines))
	if len(gcLines) == 0 {
		t.Errorf("the agent released the dead pods' addresses without logging it")
	}
}

// nodeENIs is the cloud's tern ENIs (IPAM pool) tagged for node, with their addresses.
func nodeENIs(l *lab.Lab, node string) map[string][]string {
	out := map[string][]string{}
	for _, e := range l.Emulator().Snapshot().ENIs {
		if e.Tags[ipam.TagCreator] == ipam.TagCreatorTern && e.Tags[ipam.TagNode] == node && e.Tags[ipam.TagKind] == "" {
			out[e.ID] = e.IPs
		}
	}
	return out
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// nodeLossLoad is the load of the node-loss test: every established flow echoes in its own
// goroutine (a flow to a dead backend blocks until its echo times out; it must not hold the
// others up), and a dialer opens new connections back to back. A flow that fails once is
// broken and stops; nothing is retried.
type nodeLossLoad struct {
	flows []*lossFlow
	stop  chan struct{}
	wg    sync.WaitGroup

	mu    sync.Mutex
	dials []lossDial
}

type lossFlow struct {
	conn    *echoConn
	backend string // the greeting: namespace/name of the backend pod
	mu      sync.Mutex
	echoes  int
	brokeAt time.Time
	why     string
}

type lossDial struct {
	began, at time.Time
	backend   string
	why       string // why it failed; "" when it succeeded
}

func (d lossDial) ok() bool { return d.why == "" }

func startNodeLossLoad(t *testing.T, ctx context.Context, client dialer, addr netip.AddrPort, flows int) *nodeLossLoad {
	t.Helper()
	ld := &nodeLossLoad{stop: make(chan struct{})}
	for range flows {
		c, who := dialEcho(t, ctx, client, addr.String())
		ld.flows = append(ld.flows, &lossFlow{conn: c, backend: who})
	}
	for _, f := range ld.flows {
		ld.wg.Add(1)
		go func() {
			defer ld.wg.Done()
			for i := 0; ; i++ {
				select {
				case <-ld.stop:
					return
				default:
				}
				err := echoErr(f.conn, fmt.Sprintf("m%d", i))
				select {
				case <-ld.stop:
					return // closed by halt
				default:
				}
				f.mu.Lock()
				if err != nil {
					f.brokeAt, f.why = time.Now(), err.Error()
					f.mu.Unlock()
					return
				}
				f.echoes++
				f.mu.Unlock()
			}
		}()
	}
	ld.wg.Add(1)
	go func() {
		defer ld.wg.Done()
		for {
			select {
			case <-ld.stop:
				return
			default:
			}
			d := lossDial{began: time.Now()}
			func() {
				dctx, dcancel := context.WithTimeout(ctx, time.Second)
				defer dcancel()
				c, err := client.Dial(dctx, addr.String())
				if err != nil {
					d.why = fmt.Sprintf("dial failed after %v: %v", time.Since(d.began).Round(time.Millisecond), err)
					return
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(time.Second))
				greet, err := bufio.NewReader(c).ReadString('\n')
				if err != nil {
					d.why = fmt.Sprintf("greeting failed after %v: %v", time.Since(d.began).Round(time.Millisecond), err)
					return
				}
				d.backend = strings.TrimSpace(greet)
			}()
			d.at = time.Now()
			ld.mu.Lock()
			ld.dials = append(ld.dials, d)
			ld.mu.Unlock()
		}
	}()
	t.Cleanup(ld.halt)
	eventually(t, 30*time.Second, "traffic on every flow and new connections", func() (bool, string) {
		n := 0
		for _, f := range ld.flows {
			f.mu.Lock()
			if f.echoes >= 5 {
				n++
			}
			f.mu.Unlock()
		}
		ld.mu.Lock()
		dials := len(ld.dials)
		ld.mu.Unlock()
		return n == len(ld.flows) && dials >= 20, fmt.Sprintf("%d of %d flows echoing, %d new connections", n, len(ld.flows), dials)
	})
	return ld
}

// flowsTo is the flows whose backend's name starts with prefix.
func (ld *nodeLossLoad) flowsTo(prefix string) []*lossFlow {
	var out []*lossFlow
	for _, f := range ld.flows {
		if strings.HasPrefix(f.backend, prefix) {
			out = append(out, f)
		}
	}
	return out
}

func (ld *nodeLossLoad) brokenFlows(of []*lossFlow) []*lossFlow {
	var out []*lossFlow
	for _, f := range of {
		f.mu.Lock()
		if !f.brokeAt.IsZero() {
			out = append(out, f)
		}
		f.mu.Unlock()
	}
	return out
}

// waitDials waits until n new connections that began after t0 match.
func (ld *nodeLossLoad) waitDials(t *testing.T, t0 time.Time, match func(lossDial) bool, n int, what string) {
	t.Helper()
	eventually(t, 60*time.Second, what, func() (bool, string) {
		ld.mu.Lock()
		defer ld.mu.Unlock()
		got := 0
		for _, d := range ld.dials {
			if d.began.After(t0) && match(d) {
				got++
			}
		}
		return got >= n, fmt.Sprintf("%d of %d", got, n)
	})
}

func (ld *nodeLossLoad) halt() {
	select {
	case <-ld.stop:
		return
	default:
	}
	close(ld.stop)
	for _, f := range ld.flows {
		f.conn.c.Close()
	}
	ld.wg.Wait()
}

type nodeLossReport struct {
	liveEchoes, liveBroken int
	deadBrokenWithin       time.Duration
	broken                 []string
	dials                  []lossDial
}

// finish stops the load and sums it up: the flows to backends named deadPrefix… broke at the
// fault at faultAt, the others must not have.
func (ld *nodeLossLoad) finish(faultAt time.Time, deadPrefix string) nodeLossReport {
	ld.halt()
	var r nodeLossReport
	for _, f := range ld.flows {
		if strings.HasPrefix(f.backend, deadPrefix) {
			if d := f.brokeAt.Sub(faultAt); !f.brokeAt.IsZero() && d > r.deadBrokenWithin {
				r.deadBrokenWithin = d
			}
			continue
		}
		r.liveEchoes += f.echoes
		if !f.brokeAt.IsZero() {
			r.liveBroken++
			r.broken = append(r.broken, fmt.Sprintf("%s at %s: %s", f.backend, f.brokeAt.Format("15:04:05.000"), f.why))
		}
	}
	ld.mu.Lock()
	r.dials = append([]lossDial(nil), ld.dials...)
	ld.mu.Unlock()
	return r
}

func (r nodeLossReport) okBetween(from, to time.Time) int {
	n := 0
	for _, d := range r.dials {
		if d.ok() && d.began.After(from) && d.began.Before(to) {
			n++
		}
	}
	return n
}

func (r nodeLossReport) failedBetween(from, to time.Time) int {
	n := 0
	for _, d := range r.dials {
		if !d.ok() && d.began.After(from) && d.began.Before(to) {
			n++
		}
	}
	return n
}

// failureKinds sorts the dials that ended between from and to and failed: refused (a RST),
// unreachable (an ICMP error the kernel matched to the socket) or other (timed out, or reset
// after the handshake).
func (r nodeLossReport) failureKinds(from, to time.Time) (refused, unreachable, other int) {
	for _, d := range r.dials {
		if d.ok() || !d.at.After(from) || !d.at.Before(to) {
			continue
		}
		switch {
		case strings.Contains(d.why, "connection refused"):
			refused++
		case strings.Contains(d.why, "network is unreachable"), strings.Contains(d.why, "no route to host"):
			unreachable++
		default:
			other++
		}
	}
	return refused, unreachable, other
}

// refusedAfter is the dials refused that began after t.
func (r nodeLossReport) refusedAfter(t time.Time) []string {
	var out []string
	for _, d := range r.dials {
		if !d.ok() && d.began.After(t) && strings.Contains(d.why, "connection refused") {
			out = append(out, d.began.Format("15:04:05.000")+" "+d.why)
		}
	}
	return out
}

func (r nodeLossReport) firstFailures(from, to time.Time, n int) []string {
	var out []string
	for _, d := range r.dials {
		if !d.ok() && d.began.After(from) && d.began.Before(to) && len(out) < n {
			out = append(out, d.began.Format("15:04:05.000")+" "+d.why)
		}
	}
	return out
}

// icmpUnreachables is the pod's kernel count of ICMP destination unreachable messages received
// (Icmp InDestUnreachs in /proc/net/snmp, read in its network namespace).
func icmpUnreachables(t *testing.T, p *lab.Pod) float64 {
	t.Helper()
	var v float64
	err := p.Exec(func() error {
		b, err := os.ReadFile("/proc/thread-self/net/snmp")
		if err != nil {
			return err
		}
		lines := strings.Split(string(b), "\n")
		for i := 0; i+1 < len(lines); i += 2 {
			names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
			if len(names) != len(values) || len(names) == 0 || names[0] != "Icmp:" {
				continue
			}
			for j := 1; j < len(names); j++ {
				if names[j] == "InDestUnreachs" {
					v, err = strconv.ParseFloat(values[j], 64)
					return err
				}
			}
		}
		return errors.New("no Icmp InDestUnreachs in /proc/net/snmp")
	})
	if err != nil {
		t.Fatalf("%s's ICMP counters: %v", p.Name, err)
	}
	return v
}
