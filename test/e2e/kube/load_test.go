//go:build linux

package kube_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/test/lab"
)

// echoService runs the chaos tests' fixture in namespace ns: two echo backends (echo-1 on
// node-1, echo-2 on node-2), a client pod on node-2 and a ClusterIP Service "echo" on port
// 7000 selecting the backends, and waits until every node's maps hold both backends.
func echoService(t *testing.T, ctx context.Context, l *lab.Lab, ns string) (*lab.Pod, netip.AddrPort) {
	t.Helper()
	app := map[string]string{"app": "echo"}
	for _, p := range []lab.PodSpec{
		{Namespace: ns, Name: "echo-1", Node: "node-1", Labels: app, ServePort: 7000},
		{Namespace: ns, Name: "echo-2", Node: "node-2", Labels: app, ServePort: 7000},
	} {
		if _, err := l.RunPod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	client, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "client", Node: "node-2"})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := l.Client().CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: corev1.ServiceSpec{Selector: app, Ports: []corev1.ServicePort{
			{Port: 7000, TargetPort: intstr.FromString("serve"), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 7000)
	onEveryNode(t, l, addr, "TCP", []string{
		netip.AddrPortFrom(l.Pod(ns, "echo-1").IP, 7000).String(), netip.AddrPortFrom(l.Pod(ns, "echo-2").IP, 7000).String()})
	return client, addr
}

// clusterIPLoad is the chaos tests' sustained traffic through one ClusterIP from one client
// pod: established long-lived flows that echo in turn, as fast as answers come, and a dialer
// that opens, uses and closes new connections back to back. Both record what failed and
// when; nothing is retried.
type clusterIPLoad struct {
	conns []*echoConn
	stop  chan struct{}
	wg    sync.WaitGroup

	mu     sync.Mutex
	broken []string // failed echoes on established flows
	echoes int
	dials  []newConn
}

type newConn struct {
	at  time.Time
	ok  bool
	why string // a failure: which step failed after how long, and its error
}

// dialer is where the load comes from: a pod (*lab.Pod) or a host outside the cluster
// (nsDialer: the lab's external client, for NodePort traffic).
type dialer interface {
	Dial(ctx context.Context, addr string) (net.Conn, error)
}

// nsDialer dials from a network namespace that is not a pod's: the lab's external client or
// an external host. A socket stays in the namespace it was created in.
type nsDialer struct{ ns netns.NsHandle }

func (d nsDialer) Dial(ctx context.Context, addr string) (net.Conn, error) {
	var c net.Conn
	err := nsutil.Do(d.ns, func() (err error) {
		c, err = (&net.Dialer{}).DialContext(ctx, "tcp4", addr)
		return err
	})
	return c, err
}

// startLoad dials flows long-lived connections to addr from client and starts the load; it
// returns once traffic flows on both paths. Stop it with stop (also registered as a cleanup).
func startLoad(t *testing.T, ctx context.Context, client dialer, addr netip.AddrPort, flows int) *clusterIPLoad {
	t.Helper()
	ld := &clusterIPLoad{conns: make([]*echoConn, flows), stop: make(chan struct{})}
	for i := range ld.conns {
		ld.conns[i], _ = dialEcho(t, ctx, client, addr.String())
	}
	ld.wg.Add(2)
	go func() {
		defer ld.wg.Done()
		for i := 0; ; i++ {
			select {
			case <-ld.stop:
				return
			default:
			}
			c := ld.conns[i%flows]
			msg := fmt.Sprintf("m%d", i)
			c.c.SetDeadline(time.Now().Add(5 * time.Second))
			_, err := fmt.Fprintf(c.c, "%s\n", msg)
			got := ""
			if err == nil {
				got, err = c.r.ReadString('\n')
			}
			ld.mu.Lock()
			if err != nil || strings.TrimSpace(got) != msg {
				ld.broken = append(ld.broken, fmt.Sprintf("flow %d at %s: %q, %v", i%flows, time.Now().Format("15:04:05.000"), got, err))
			} else {
				ld.echoes++
			}
			ld.mu.Unlock()
		}
	}()
	go func() {
		defer ld.wg.Done()
		for {
			select {
			case <-ld.stop:
				return
			default:
			}
			began := time.Now()
			why := func() string {
				dctx, dcancel := context.WithTimeout(ctx, time.Second)
				defer dcancel()
				c, err := client.Dial(dctx, addr.String())
				if err != nil {
					return fmt.Sprintf("dial failed after %v: %v", time.Since(began).Round(time.Millisecond), err)
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(time.Second))
				connected := time.Since(began).Round(time.Millisecond)
				if _, err = bufio.NewReader(c).ReadString('\n'); err != nil {
					return fmt.Sprintf("connected in %v, greeting failed after %v: %v", connected, time.Since(began).Round(time.Millisecond), err)
				}
				return ""
			}()
			ld.mu.Lock()
			ld.dials = append(ld.dials, newConn{time.Now(), why == "", why})
			ld.mu.Unlock()
		}
	}()
	t.Cleanup(ld.halt)
	// Traffic flows before the fault: wait for it, not for a while.
	eventually(t, 30*time.Second, "traffic on both paths", func() (bool, string) {
		ld.mu.Lock()
		defer ld.mu.Unlock()
		return ld.echoes >= 100 && ld.newOKAfterLocked(time.Time{}) >= 20, fmt.Sprintf("%d echoes, %d new connections", ld.echoes, len(ld.dials))
	})
	return ld
}

func (ld *clusterIPLoad) newOKAfterLocked(t0 time.Time) int {
	n := 0
	for _, d := range ld.dials {
		if d.ok && d.at.After(t0) {
			n++
		}
	}
	return n
}

// waitNewConns waits until n new connections succeeded after t0.
func (ld *clusterIPLoad) waitNewConns(t *testing.T, t0 time.Time, n int, what string) {
	t.Helper()
	eventually(t, 60*time.Second, what, func() (bool, string) {
		ld.mu.Lock()
		defer ld.mu.Unlock()
		got := ld.newOKAfterLocked(t0)
		return got >= n, fmt.Sprintf("%d of %d new connections", got, n)
	})
}

// halt stops the load and closes the flows; repeating it is a no-op.
func (ld *clusterIPLoad) halt() {
	select {
	case <-ld.stop:
		return
	default:
	}
	close(ld.stop)
	ld.wg.Wait()
	for _, c := range ld.conns {
		c.c.Close()
	}
}

// loadReport is what the load saw, for the chaos table in docs/reliability.md.
type loadReport struct {
	Flows, Echoes, Dials, Failed int
	Broken                       []string
	FailedHow                    []string // the first 5 failed new connections: how they failed
	// Gap is the longest time between two successful new connections from a second before
	// the fault on.
	Gap time.Duration
}

func (r loadReport) String() string {
	return fmt.Sprintf("%d established flows held %d echoes, %d broke; %d new connections, %d failed; longest gap between successful new connections around the fault %v",
		r.Flows, r.Echoes, len(r.Broken), r.Dials, r.Failed, r.Gap.Round(time.Millisecond))
}

// finish stops the load and summarises it around the fault at faultAt.
func (ld *clusterIPLoad) finish(faultAt time.Time) loadReport {
	ld.halt()
	ld.mu.Lock()
	defer ld.mu.Unlock()
	r := loadReport{Flows: len(ld.conns), Echoes: ld.echoes, Dials: len(ld.dials), Broken: ld.broken}
	last := time.Time{}
	for _, d := range ld.dials {
		if !d.ok {
			r.Failed++
			if len(r.FailedHow) < 5 {
				r.FailedHow = append(r.FailedHow, d.at.Format("15:04:05.000")+" "+d.why)
			}
			continue
		}
		if !last.IsZero() && d.at.After(faultAt.Add(-time.Second)) && d.at.Sub(last) > r.Gap {
			r.Gap = d.at.Sub(last)
		}
		last = d.at
	}
	return r
}

// requireNoBrokenFlows fails the test when an established flow lost an echo.
func requireNoBrokenFlows(t *testing.T, r loadReport) {
	t.Helper()
	if len(r.Broken) > 0 {
		t.Fatalf("%d echoes failed on established flows, first: %s", len(r.Broken), r.Broken[0])
	}
}

// agentMetric sums the node agent's samples of metric whose labels contain every one of
// labels (e.g. `action="AssignPrivateIpAddresses"`); 0 when there are none.
func agentMetric(t *testing.T, ctx context.Context, n *lab.Node, metric string, labels ...string) float64 {
	t.Helper()
	sum := 0.0
	for _, v := range agentSamples(t, ctx, n, metric, labels...) {
		sum += v
	}
	return sum
}

// agentSamples is the node agent's samples of metric whose labels contain every one of
// labels, by their label set as exposed (`{reason="pass",direction="to-netdev"}`).
func agentSamples(t *testing.T, ctx context.Context, n *lab.Node, metric string, labels ...string) map[string]float64 {
	t.Helper()
	m, err := n.Client().Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, line := range strings.Split(m, "\n") {
		sp := strings.LastIndexByte(line, ' ')
		if sp < 0 || strings.HasPrefix(line, "#") {
			continue
		}
		name, rest := line[:sp], line[sp+1:]
		lbl := ""
		if i := strings.IndexByte(name, '{'); i >= 0 {
			name, lbl = name[:i], name[i:]
		}
		if name != metric {
			continue
		}
		match := true
		for _, want := range labels {
			match = match && strings.Contains(lbl, want)
		}
		if !match {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		out[lbl] += v
	}
	return out
}

// drops is the node's datapath drop counters (tern_datapath_packets_total with a drop_*
// reason), by label set.
func drops(t *testing.T, ctx context.Context, n *lab.Node) map[string]float64 {
	t.Helper()
	return agentSamples(t, ctx, n, "tern_datapath_packets_total", `reason="drop_`)
}

// dropsSince is what drops rose by since before (only the counters that moved).
func dropsSince(t *testing.T, ctx context.Context, n *lab.Node, before map[string]float64) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for k, v := range drops(t, ctx, n) {
		if d := v - before[k]; d != 0 {
			out[k] = d
		}
	}
	return out
}
