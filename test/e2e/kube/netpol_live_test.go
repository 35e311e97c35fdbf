//go:build linux

package kube_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/test/lab"
)

// liveFlow is one established flow (TCP connection or connected UDP socket) that exchanges
// a message every 10 ms while the test changes labels and policies, and counts per phase how
// many round trips worked and which failed.
type liveFlow struct {
	name string
	rt   func(msg string) error // one round trip, bounded
	ok   []atomic.Int64         // per phase
	mu   sync.Mutex
	errs []string
}

// TestPolicyChangeUnderLiveTraffic: allowed established flows keep working across a label
// change and a policy change that still allow them, and a new deny applies to new
// connections only. The rule tern follows (as Cilium and the iptables implementations do):
// a verdict is cached in the flow's conntrack entry, so a flow admitted under the old state
// keeps flowing until it ends (closes, or its conntrack entry idles out); new connections —
// and a new TCP SYN on an old tuple — are judged by the policies of the moment.
//
// Two clients (one on the server's node, one on the other) each hold a TCP connection and
// a UDP flow to the server, exchanging a message every 10 ms through five phases:
//  1. policies: deny all ingress of srv, allow app=client on TCP 80 and UDP 53;
//  2. label change: both clients get version=v2 (new identities, still allowed);
//  3. policy change: allow-v2 (app=client, version=v2) replaces allow-clients;
//  4. new deny by label: the remote client becomes app=other: its new connections are
//     denied, its established flows keep working;
//  5. new deny by policy: allow-v2 is deleted: the local client's new connections are
//     denied, its established flows keep working.
//
// Each phase waits until both agents' maps hold the apiserver's state, then checks new
// connections (fresh source ports) and that every flow completed round trips in the phase;
// at the end no round trip of any established flow may have failed.
func TestPolicyChangeUnderLiveTraffic(t *testing.T) {
	l := getLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := l.Client()
	const ns = "np-live"
	srv, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "srv", Node: "node-1", Labels: map[string]string{"app": "srv"}, ServePort: 80})
	if err != nil {
		t.Fatal(err)
	}
	stopDNS, err := serveUDPEcho(srv, 53)
	if err != nil {
		t.Fatal(err)
	}
	defer stopDNS()
	remote, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "remote", Node: "node-2", Labels: map[string]string{"app": "client"}})
	if err != nil {
		t.Fatal(err)
	}
	local, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: "local", Node: "node-1", Labels: map[string]string{"app": "client"}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = c.NetworkingV1().NetworkPolicies(ns).DeleteCollection(context.WithoutCancel(ctx), metav1.DeleteOptions{}, metav1.ListOptions{})
	}()
	views := openNodeMaps(t, ctx, l)
	ports := newSourcePorts()
	settle := func(step string) {
		t.Helper()
		if err := waitPolicyMaps(ctx, l, views, 30*time.Second); err != nil {
			t.Fatalf("%s: %v", step, err)
		}
	}
	// newConns checks fresh TCP and UDP connections from p against want.
	newConns := func(step string, p *lab.Pod, want bool) {
		t.Helper()
		for _, s := range []struct {
			proto string
			port  uint16
		}{{"TCP", 80}, {"UDP", 53}} {
			src, err := ports.take()
			if err != nil {
				t.Fatal(err)
			}
			got, err := probe(ctx, p, srv.IP, s.proto, s.port, src)
			if err != nil {
				t.Fatalf("%s: %v", step, err)
			}
			if got != want {
				t.Fatalf("%s: a new %s connection from %s to srv:%d: allowed %v, want %v", step, s.proto, p.Key(), s.port, got, want)
			}
		}
	}
	create := func(name string, from map[string]string) {
		t.Helper()
		udp := corev1.ProtocolUDP
		p80, p53 := intstr.FromInt32(80), intstr.FromInt32(53)
		np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "srv"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}}}
		if from != nil {
			np.Spec.Ingress = []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: from}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: &p80}, {Protocol: &udp, Port: &p53}}}}
		}
		if _, err := c.NetworkingV1().NetworkPolicies(ns).Create(ctx, np, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	create("deny-all", nil)
	create("allow-clients", map[string]string{"app": "client"})
	settle("phase 1")
	newConns("phase 1", remote, true)
	newConns("phase 1", local, true)

	const phases = 5
	var flows []*liveFlow
	for _, p := range []*lab.Pod{remote, local} {
		tc, err := p.Dial(ctx, netip.AddrPortFrom(srv.IP, 80).String())
		if err != nil {
			t.Fatal(err)
		}
		defer tc.Close()
		r := bufio.NewReader(tc)
		if _, err := r.ReadString('\n'); err != nil { // the greeting
			t.Fatal(err)
		}
		flows = append(flows, &liveFlow{name: "tcp from " + p.Key(), ok: make([]atomic.Int64, phases), rt: func(msg string) error {
			_ = tc.SetDeadline(time.Now().Add(time.Second))
			if _, err := fmt.Fprintf(tc, "%s\n", msg); err != nil {
				return err
			}
			got, err := r.ReadString('\n')
			if err == nil && got != msg+"\n" {
				err = fmt.Errorf("echo %q, want %q", got, msg)
			}
			return err
		}})
		var uc *net.UDPConn
		if err := p.Exec(func() error {
			var err error
			uc, err = net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(srv.IP, 53)))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer uc.Close()
		flows = append(flows, &liveFlow{name: "udp from " + p.Key(), ok: make([]atomic.Int64, phases), rt: func(msg string) error {
			_ = uc.SetDeadline(time.Now().Add(time.Second))
			if _, err := uc.Write([]byte(msg)); err != nil {
				return err
			}
			buf := make([]byte, 256)
			n, err := uc.Read(buf)
			if err == nil && string(buf[:n]) != msg {
				err = fmt.Errorf("echo %q, want %q", buf[:n], msg)
			}
			return err
		}})
	}
	var phase atomic.Int32
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, f := range flows {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(10 * time.Millisecond)
			defer tick.Stop()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				ph := phase.Load()
				if err := f.rt(fmt.Sprintf("m%d", i)); err != nil {
					f.mu.Lock()
					f.errs = append(f.errs, fmt.Sprintf("phase %d: %v", ph+1, err))
					f.mu.Unlock()
					continue
				}
				f.ok[ph].Add(1)
			}
		}()
	}
	// Each phase lasts until every flow has made some round trips in it. The last one stays
	// current until the flows stop: a round trip that began after it ended counts in it (the
	// flows' goroutines index ok by the phase, and ok has one entry a phase).
	endPhase := func(step string) {
		t.Helper()
		ph := phase.Load()
		eventually(t, 10*time.Second, step+": every established flow exchanges messages", func() (bool, string) {
			for _, f := range flows {
				if f.ok[ph].Load() < 5 {
					return false, fmt.Sprintf("%s: %d round trips", f.name, f.ok[ph].Load())
				}
			}
			return true, ""
		})
		if ph+1 < phases {
			phase.Add(1)
		}
	}
	endPhase("phase 1")

	relabelPod(t, ctx, l, remote, "version", "v2")
	relabelPod(t, ctx, l, local, "version", "v2")
	settle("phase 2 (label change)")
	newConns("phase 2", remote, true)
	newConns("phase 2", local, true)
	endPhase("phase 2")

	create("allow-v2", map[string]string{"app": "client", "version": "v2"})
	if err := c.NetworkingV1().NetworkPolicies(ns).Delete(ctx, "allow-clients", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	settle("phase 3 (policy change)")
	newConns("phase 3", remote, true)
	newConns("phase 3", local, true)
	endPhase("phase 3")

	relabelPod(t, ctx, l, remote, "app", "other")
	settle("phase 4 (deny by label)")
	newConns("phase 4", remote, false)
	newConns("phase 4", local, true)
	endPhase("phase 4")

	if err := c.NetworkingV1().NetworkPolicies(ns).Delete(ctx, "allow-v2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	settle("phase 5 (deny by policy)")
	newConns("phase 5", remote, false)
	newConns("phase 5", local, false)
	endPhase("phase 5")

	close(stop)
	wg.Wait()
	var bad []string
	for _, f := range flows {
		counts := make([]int64, phases)
		for i := range counts {
			counts[i] = f.ok[i].Load()
		}
		t.Logf("%s: round trips per phase %v", f.name, counts)
		if len(f.errs) > 0 {
			bad = append(bad, fmt.Sprintf("%s: %s", f.name, strings.Join(f.errs, "; ")))
		}
	}
	if len(bad) > 0 {
		t.Fatalf("established flows broke:\n%s", strings.Join(bad, "\n"))
	}
}
