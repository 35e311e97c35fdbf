//go:build linux

package lab_test

import (
	"context"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/test/lab"
)

// hostPort in ENIIP mode: the pod's portMappings reach the agent through tern-cni, a pod on
// the node reaches the hostPort at the node's primary address (the pod program translates
// it), a second pod cannot take the same hostPort, and DEL removes it.
func TestHostPortENIIP(t *testing.T) {
	l := up(t, lab.Options{Nodes: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	n := l.Nodes()[0]
	web, err := l.AddPodWithHostPorts(ctx, 0, "default", "web", []api.PortMapping{{HostPort: 9090, ContainerPort: 8080, Protocol: "tcp"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := web.Serve(8080); err != nil {
		t.Fatal(err)
	}
	client, err := l.AddPod(ctx, 0, "default", "client")
	if err != nil {
		t.Fatal(err)
	}
	hp := net.JoinHostPort(n.PrimaryIP, "9090")
	got, err := client.Ask(ctx, hp, "hello")
	if err != nil || got != "default/web" {
		t.Fatalf("hostPort %s from pod client: %q, %v; want default/web", hp, got, err)
	}
	t.Logf("pod client reached hostPort %s → %s (ENIIP mode)", hp, got)

	// A second pod on the same hostPort is refused, and the first keeps it.
	if _, err := l.AddPodWithHostPorts(ctx, 0, "default", "web2", []api.PortMapping{{HostPort: 9090, ContainerPort: 8080}}); err == nil {
		t.Fatal("a second pod was given hostPort 9090 already held by web")
	} else if te, ok := lab.CNIError(err); !ok || te.Code != api.CodeInvalidConfig {
		t.Fatalf("second pod on hostPort 9090: %v, want CNI code %d", err, api.CodeInvalidConfig)
	}
	if got, err := client.Ask(ctx, hp, "again"); err != nil || got != "default/web" {
		t.Fatalf("hostPort %s after the refused pod: %q, %v", hp, got, err)
	}

	if err := l.DeletePod(ctx, web); err != nil {
		t.Fatal(err)
	}
	m, err := loader.OpenPinnedMaps(n.PinRoot())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	svcs, err := m.DumpServices()
	if err != nil {
		t.Fatal(err)
	}
	for k := range svcs {
		if loader.BEToPort(k.Port) == 9090 {
			t.Fatalf("frontend %s:9090 left after DEL of web", loader.BEToAddr(k.Addr))
		}
	}
	if _, err := client.Ask(ctx, hp, "gone"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("hostPort %s after DEL of web: %v, want connection refused (nothing listens on the node)", hp, err)
	}
}

// The Service controller's full sync never deletes a hostPort: with the real apiserver and
// the apiserver's own `kubernetes` Service, the agent is killed and restarted (its first full sync rewrites the LB
// maps to exactly what it wants), and the hostPort still answers, next to the Service.
func TestHostPortSurvivesServiceFullSync(t *testing.T) {
	l := upKubernetes(t, lab.Options{Nodes: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	n := l.Nodes()[0]
	if err := l.EnsureNamespace(ctx, "hp"); err != nil {
		t.Fatal(err)
	}
	web, err := l.AddPodWithHostPorts(ctx, 0, "hp", "web", []api.PortMapping{{HostPort: 9091, ContainerPort: 8080}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := web.Serve(8080); err != nil {
		t.Fatal(err)
	}
	client, err := l.AddPod(ctx, 0, "hp", "client")
	if err != nil {
		t.Fatal(err)
	}
	hp := net.JoinHostPort(n.PrimaryIP, "9091")
	if got, err := client.Ask(ctx, hp, "before"); err != nil || got != "hp/web" {
		t.Fatalf("hostPort %s before the restart: %q, %v", hp, got, err)
	}
	if err := n.KillAgent(); err != nil {
		t.Fatal(err)
	}
	if err := n.StartAgent(ctx); err != nil { // ready = the first full Service sync is done
		t.Fatal(err)
	}
	if got, err := client.Ask(ctx, hp, "after"); err != nil || got != "hp/web" {
		t.Fatalf("hostPort %s after kill -9 and the new agent's first full Service sync: %q, %v", hp, got, err)
	}
	t.Logf("hostPort %s still answered by %s after the restarted agent's first full Service sync", hp, "hp/web")
}
