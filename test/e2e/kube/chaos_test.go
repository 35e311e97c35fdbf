//go:build linux

package kube_test

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/test/lab"
)

// TestAgentKill9UnderClusterIPTraffic kills the client node's agent with SIGKILL while
// established connections through a ClusterIP carry echoes and a dialer opens new ones
// back to back, then restarts it. No established flow may break (the programs and pinned
// maps outlive the agent); the new-connection gap (the longest time between two successful
// new connections around the kill) and the failed new connections are reported, for the
// chaos table in docs/reliability.md.
func TestAgentKill9UnderClusterIPTraffic(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const ns = "e2e-chaos"
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

	const flows = 20
	conns := make([]*echoConn, flows)
	for i := range conns {
		conns[i], _ = dialEcho(t, ctx, client, addr.String())
		defer conns[i].c.Close()
	}

	// Load: every established flow echoes in turn, as fast as answers come; a dialer opens,
	// uses and closes new connections back to back. Both record what failed and when.
	type newConn struct {
		at time.Time
		ok bool
	}
	var (
		mu         sync.Mutex
		broken     []string
		echoes     int
		dials      []newConn
		stop       = make(chan struct{})
		wg         sync.WaitGroup
		newOKAfter = func(t0 time.Time) int {
			n := 0
			for _, d := range dials {
				if d.ok && d.at.After(t0) {
					n++
				}
			}
			return n
		}
	)
	wg.Add(2)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			c := conns[i%flows]
			msg := fmt.Sprintf("m%d", i)
			c.c.SetDeadline(time.Now().Add(5 * time.Second))
			_, err := fmt.Fprintf(c.c, "%s\n", msg)
			got := ""
			if err == nil {
				got, err = c.r.ReadString('\n')
			}
			mu.Lock()
			if err != nil || strings.TrimSpace(got) != msg {
				broken = append(broken, fmt.Sprintf("flow %d at %s: %q, %v", i%flows, time.Now().Format("15:04:05.000"), got, err))
			} else {
				echoes++
			}
			mu.Unlock()
		}
	}()
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			ok := func() bool {
				dctx, dcancel := context.WithTimeout(ctx, time.Second)
				defer dcancel()
				c, err := client.Dial(dctx, addr.String())
				if err != nil {
					return false
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(time.Second))
				_, err = bufio.NewReader(c).ReadString('\n')
				return err == nil
			}()
			mu.Lock()
			dials = append(dials, newConn{time.Now(), ok})
			mu.Unlock()
		}
	}()

	// Traffic flows before the fault: wait for it, not for a while.
	eventually(t, 30*time.Second, "traffic on both paths", func() (bool, string) {
		mu.Lock()
		defer mu.Unlock()
		return echoes >= 100 && newOKAfter(time.Time{}) >= 20, fmt.Sprintf("%d echoes, %d new connections", echoes, len(dials))
	})
	n, err := l.NodeByName("node-2")
	if err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	if err := n.KillAgent(); err != nil {
		t.Fatal(err)
	}
	if err := n.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	ready := time.Now()
	// And after the restart, until the dialer has succeeded 50 more times.
	eventually(t, 60*time.Second, "new connections after the restart", func() (bool, string) {
		mu.Lock()
		defer mu.Unlock()
		return newOKAfter(ready) >= 50, fmt.Sprintf("%d since the agent was ready", newOKAfter(ready))
	})
	close(stop)
	wg.Wait()

	failed, gap, last := 0, time.Duration(0), time.Time{}
	for _, d := range dials {
		if !d.ok {
			failed++
			continue
		}
		if !last.IsZero() && d.at.After(killed.Add(-time.Second)) && d.at.Sub(last) > gap {
			gap = d.at.Sub(last)
		}
		last = d.at
	}
	t.Logf("agent of node-2 killed (-9) and ready again after %v; %d flows held %d echoes; %d new connections, %d failed; longest gap between successful new connections around the kill: %v",
		ready.Sub(killed).Round(time.Millisecond), flows, echoes, len(dials), failed, gap.Round(time.Millisecond))
	if len(broken) > 0 {
		t.Fatalf("%d echoes failed on established flows, first: %s", len(broken), broken[0])
	}
}
