//go:build linux

package lab_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/ternctl"
	"github.com/tern-net/tern/test/lab"
)

// frontendKey names a frontend as ternctl reads it from the pinned maps.
type frontendKey struct {
	addr  netip.AddrPort
	proto string
}

// createDNSLikeServices creates n Services with a UDP and a TCP port 53 each, from a few
// parallel clients, and returns their frontends.
func createDNSLikeServices(t *testing.T, ctx context.Context, c kubernetes.Interface, ns string, n int) map[frontendKey]bool {
	t.Helper()
	var (
		mu    sync.Mutex
		out   = map[frontendKey]bool{}
		errs  []error
		wg    sync.WaitGroup
		items = make(chan int)
	)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range items {
				s, err := c.CoreV1().Services(ns).Create(ctx, &corev1.Service{
					ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("dns-%04d", i)},
					Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
						{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
						{Name: "dns-tcp", Port: 53, Protocol: corev1.ProtocolTCP}}},
				}, metav1.CreateOptions{})
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				} else {
					vip := netip.MustParseAddr(s.Spec.ClusterIP)
					out[frontendKey{netip.AddrPortFrom(vip, 53), "UDP"}] = true
					out[frontendKey{netip.AddrPortFrom(vip, 53), "TCP"}] = true
				}
				mu.Unlock()
			}
		}()
	}
	for i := range n {
		items <- i
	}
	close(items)
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("create %d Services: %d failed, first: %v", n, len(errs), errs[0])
	}
	return out
}

// missingFrontends reads the node's pinned service map and counts the wanted frontends it
// lacks, naming one of them.
func missingFrontends(t *testing.T, n *lab.Node, want map[frontendKey]bool) (int, string) {
	t.Helper()
	svcs, err := ternctl.ReadServicesAt(n.PinRoot())
	if err != nil {
		t.Fatalf("read the pinned service map of %s: %v", n.Name, err)
	}
	have := make(map[frontendKey]bool, len(svcs))
	for _, s := range svcs {
		have[frontendKey{s.Frontend, s.Proto}] = true
	}
	missing, example := 0, ""
	for f := range want {
		if !have[f] {
			missing++
			example = fmt.Sprintf("%s/%s", f.addr, f.proto)
		}
	}
	return missing, example
}

// TestFreshNodeIsNotReadyBeforeTheFirstServiceSync joins a fresh node (no pins, no CNI
// configuration) to a cluster that already has 2,000 Services (4,000 frontends). While the
// agent cannot list them (its path to the apiserver is cut) it serves its pool but stays not
// ready: /readyz answers 503 naming the services component and what it waits for, CNI STATUS
// through the real plugin fails with "not available", and no conflist is installed. Once the
// apiserver is reachable, at the first moment /readyz answers 200 and at the first moment
// the conflist exists, every frontend is already in the pinned maps.
func TestFreshNodeIsNotReadyBeforeTheFirstServiceSync(t *testing.T) {
	l := upKubernetes(t, lab.Options{Nodes: 1, DeferAgents: true})
	n := l.Node(0)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	const ns, services = "many", 2000
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	want := createDNSLikeServices(t, ctx, l.Client(), ns, services)
	t.Logf("created %d Services (%d frontends) in %s", services, len(want), time.Since(start).Round(time.Millisecond))

	if err := n.SetAPIServerReachable(false); err != nil {
		t.Fatal(err)
	}
	exited, err := n.LaunchAgent()
	if err != nil {
		t.Fatal(err)
	}
	conflist := filepath.Join(n.AgentConfDir(), api.ConflistFile)

	// Held: the agent itself is up (datapath loaded, pool serving), the services component
	// waits for its informers and says why.
	var held string
	deadline := time.Now().Add(90 * time.Second)
	for {
		code, body, err := n.Readyz(ctx, true)
		if err == nil && code == 200 {
			t.Fatalf("/readyz answered 200 while the agent cannot reach the apiserver:\n%s", body)
		}
		if err == nil && code == 503 && strings.Contains(body, "[+]agent ready") &&
			strings.Contains(body, "[-]services: waiting for the informers' initial lists") {
			held = body
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent never reported itself up and held on the Service informers (last: %d %q %v)", code, body, err)
		}
		select {
		case <-exited:
			t.Fatalf("the agent exited; see %s", n.AgentLog())
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Logf("held without the apiserver; /readyz?verbose:\n%s", held)
	if _, err := os.Stat(conflist); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("conflist %s while the Services are not synced: %v", conflist, err)
	}
	serr := n.Status(ctx)
	if cerr, ok := lab.CNIError(serr); !ok || cerr.Code != 50 || !strings.Contains(cerr.Details, "services:") {
		t.Fatalf("CNI STATUS while the Services are not synced: %v; want code 50 (not available) naming the services component", serr)
	}
	if missing, _ := missingFrontends(t, n, want); missing == 0 {
		t.Fatal("every frontend is already in the maps although the agent never reached the apiserver")
	}

	if err := n.SetAPIServerReachable(true); err != nil {
		t.Fatal(err)
	}
	reconnected := time.Now()
	var sawReady, sawConflist bool
	reasons := map[string]bool{}
	deadline = time.Now().Add(2 * time.Minute)
	for !sawReady || !sawConflist {
		if !sawConflist {
			if _, err := os.Stat(conflist); err == nil {
				sawConflist = true
				if missing, example := missingFrontends(t, n, want); missing > 0 {
					t.Fatalf("the conflist appeared with %d of %d frontends missing from the maps (e.g. %s)", missing, len(want), example)
				}
				t.Logf("conflist installed %s after the apiserver came back; every frontend was in the maps",
					time.Since(reconnected).Round(time.Millisecond))
			}
		}
		if !sawReady {
			code, body, err := n.Readyz(ctx, false)
			switch {
			case err == nil && code == 200:
				sawReady = true
				if missing, example := missingFrontends(t, n, want); missing > 0 {
					t.Fatalf("/readyz answered 200 with %d of %d frontends missing from the maps (e.g. %s)", missing, len(want), example)
				}
				t.Logf("/readyz 200 %s after the apiserver came back; every frontend was in the maps",
					time.Since(reconnected).Round(time.Millisecond))
			case err == nil:
				reasons[body] = true
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready 2 minutes after the apiserver came back (ready %v, conflist %v); reasons seen: %v", sawReady, sawConflist, reasons)
		}
		select {
		case <-exited:
			t.Fatalf("the agent exited; see %s", n.AgentLog())
		case <-time.After(2 * time.Millisecond):
		}
	}
	for r := range reasons {
		t.Logf("/readyz on the way: %q", r)
	}
	if err := n.Status(ctx); err != nil {
		t.Fatalf("CNI STATUS once ready: %v", err)
	}
}
