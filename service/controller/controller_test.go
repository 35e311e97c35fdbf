package controller_test

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/controller"
	"github.com/tern-net/tern/service/lbmap"
	"github.com/tern-net/tern/test/k8s/controlplane"
	"github.com/tern-net/tern/test/k8s/kubeletsim"
)

func startControlPlane(t *testing.T) *controlplane.ControlPlane {
	t.Helper()
	if _, err := controlplane.BinDir(); err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{ControllerManager: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cp.Stop() })
	return cp
}

// backendsIn reads what the maps hold for a frontend, straight from the kernel.
func backendsIn(t *testing.T, m *loader.Maps, f service.Frontend) ([]string, bool) {
	t.Helper()
	var v loader.ServiceValue
	k := loader.ServiceKey{Addr: loader.AddrToBE(f.Addr), Port: loader.PortToBE(f.Port), Proto: uint8(f.Proto)}
	if err := m.Services.Lookup(k, &v); err != nil {
		return nil, false
	}
	var out []string
	for i := uint32(1); i <= uint32(v.BackendCount); i++ {
		var b loader.BackendValue
		if err := m.Backends.Lookup(loader.BackendKey{SvcId: v.Id, Slot: i}, &b); err != nil {
			t.Fatalf("slot %d of %s: %v", i, f, err)
		}
		out = append(out, netip.AddrPortFrom(loader.BEToAddr(b.Addr), loader.BEToPort(b.Port)).String())
	}
	slices.Sort(out)
	return out, true
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	// Generous: after an apiserver restart client-go reconnects with exponential backoff, and
	// CI runs other suites on the same two cores.
	deadline := time.Now().Add(90 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestControllerFollowsTheAPIServer(t *testing.T) {
	testutil.RequirePrivileged(t)
	cp := startControlPlane(t)
	client := kubernetes.NewForConfigOrDie(cp.RestConfig())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	d := loadertest.New(t, loader.Config{})
	rec, err := lbmap.NewReconciler(d.Maps(), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctl, err := controller.New(client, rec, controller.Options{Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ctl.Run(ctx) }()
	defer func() { cancel(); <-done }()

	if _, err := kubeletsim.EnsureNode(ctx, client, "node-a", "192.168.0.10"); err != nil {
		t.Fatal(err)
	}
	ns := "web"
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svc, err := client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("web"), Protocol: corev1.ProtocolTCP},
			{Name: "dns", Port: 53, TargetPort: intstr.FromInt32(5353), Protocol: corev1.ProtocolUDP},
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := netip.MustParseAddr(svc.Spec.ClusterIP)
	http := service.Frontend{Addr: vip, Port: 80, Proto: service.TCP}
	dns := service.Frontend{Addr: vip, Port: 53, Proto: service.UDP}

	// A Service with no pods yet: the frontend exists with no backends (reject).
	waitFor(t, "frontend without backends", func() bool { b, ok := backendsIn(t, d.Maps(), http); return ok && len(b) == 0 })

	// Pods whose named port "web" resolves to different numbers.
	for i, port := range []int32{8080, 9090} {
		_, err := kubeletsim.RunPod(ctx, client, kubeletsim.PodSpec{Namespace: ns, Name: fmt.Sprintf("web-%d", i), Node: "node-a",
			Labels: map[string]string{"app": "web"}, Ports: []corev1.ContainerPort{{Name: "web", ContainerPort: port}}},
			fmt.Sprintf("10.0.1.%d", 20+i))
		if err != nil {
			t.Fatal(err)
		}
	}
	want := []string{"10.0.1.20:8080", "10.0.1.21:9090"}
	waitFor(t, "both pods as backends of the named port", func() bool {
		b, _ := backendsIn(t, d.Maps(), http)
		return slices.Equal(b, want)
	})
	waitFor(t, "the UDP port's backends", func() bool {
		b, _ := backendsIn(t, d.Maps(), dns)
		return slices.Equal(b, []string{"10.0.1.20:5353", "10.0.1.21:5353"})
	})

	// Pod churn: one pod goes, its endpoint leaves the map.
	if err := kubeletsim.DeletePod(ctx, client, ns, "web-0"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "deleted pod to leave the backends", func() bool {
		b, _ := backendsIn(t, d.Maps(), http)
		return slices.Equal(b, []string{"10.0.1.21:9090"})
	})

	// An apiserver restart: the informers reconnect and later changes still arrive.
	if err := cp.RestartAPIServer(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := kubeletsim.RunPod(ctx, client, kubeletsim.PodSpec{Namespace: ns, Name: "web-2", Node: "node-a",
		Labels: map[string]string{"app": "web"}, Ports: []corev1.ContainerPort{{Name: "web", ContainerPort: 8080}}}, "10.0.1.22"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a pod created after the apiserver restart", func() bool {
		b, _ := backendsIn(t, d.Maps(), http)
		return slices.Equal(b, []string{"10.0.1.21:9090", "10.0.1.22:8080"})
	})

	// Service deletion removes both frontends.
	if err := client.CoreV1().Services(ns).Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "deleted service to leave the maps", func() bool {
		_, ok1 := backendsIn(t, d.Maps(), http)
		_, ok2 := backendsIn(t, d.Maps(), dns)
		return !ok1 && !ok2
	})
}

// A full service map is bad input the agent cannot fix: the Services that fit keep being
// served, the one that does not gets a Warning Event saying so, and it is retried.
func TestFullMapIsReportedAndOthersKeepServing(t *testing.T) {
	testutil.RequirePrivileged(t)
	cp := startControlPlane(t)
	client := kubernetes.NewForConfigOrDie(cp.RestConfig())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// Room for the apiserver's own "kubernetes" Service and two more frontends.
	d := loadertest.New(t, loader.Config{MaxServices: 3})
	rec, err := lbmap.NewReconciler(d.Maps(), nil)
	if err != nil {
		t.Fatal(err)
	}
	b := record.NewBroadcaster(record.WithContext(ctx))
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	defer b.Shutdown()
	recorder := b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "tern-agent-test"})
	ctl, err := controller.New(client, rec, controller.Options{Logger: zaptest.NewLogger(t), Recorder: recorder})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ctl.Run(ctx) }()
	defer func() { cancel(); <-done }()

	var vips []netip.Addr
	for i := 0; i < 3; i++ {
		s, err := client.CoreV1().Services("default").Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("s%d", i)},
			Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80, Protocol: corev1.ProtocolTCP}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		vip := netip.MustParseAddr(s.Spec.ClusterIP)
		vips = append(vips, vip)
		// In order, so the third is the one that does not fit: the next Service is created
		// only once this one's frontend is in the map.
		if i < 2 {
			waitFor(t, fmt.Sprintf("service %s (%s) in the map", s.Name, vip), func() bool {
				_, ok := backendsIn(t, d.Maps(), service.Frontend{Addr: vip, Port: 80, Proto: service.TCP})
				return ok
			})
		}
	}
	waitFor(t, "a map-full Event on the Service that did not fit", func() bool {
		evs, err := client.CoreV1().Events("default").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=s2"})
		if err != nil {
			return false
		}
		for _, e := range evs.Items {
			if e.Reason == "TernLoadBalancerMapFull" {
				t.Logf("event: %s", e.Message)
				return true
			}
		}
		return false
	})
	for _, vip := range vips[:2] {
		if _, ok := backendsIn(t, d.Maps(), service.Frontend{Addr: vip, Port: 80, Proto: service.TCP}); !ok {
			t.Fatalf("service %s that fits is not served", vip)
		}
	}
	// Room again: the one that did not fit gets in without waiting for the periodic resync
	// (5 minutes) — its retry must write what failed, and the freeing sync wakes it.
	if err := client.CoreV1().Services("default").Delete(ctx, "s0", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the service that did not fit in the map once s0 is gone", func() bool {
		_, ok := backendsIn(t, d.Maps(), service.Frontend{Addr: vips[2], Port: 80, Proto: service.TCP})
		return ok
	})
}

// TestSetNodeMovesNodePorts: a NodePort is served on the node's addresses as SetNode gives
// them while the controller runs: an address added gets the NodePort frontend, one removed
// loses it, with no restart.
func TestSetNodeMovesNodePorts(t *testing.T) {
	testutil.RequirePrivileged(t)
	cp := startControlPlane(t)
	client := kubernetes.NewForConfigOrDie(cp.RestConfig())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	d := loadertest.New(t, loader.Config{})
	rec, err := lbmap.NewReconciler(d.Maps(), nil)
	if err != nil {
		t.Fatal(err)
	}
	oldAddr, newAddr := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("192.0.2.11")
	node := service.Node{Name: "node-a", Addrs: []netip.Addr{oldAddr}}
	ctl, err := controller.New(client, rec, controller.Options{Logger: zaptest.NewLogger(t), Translator: service.Translator{Node: node}})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ctl.Run(ctx) }()
	defer func() { cancel(); <-done }()

	svc, err := client.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "np"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(svc.Spec.Ports[0].NodePort)
	onOld := service.Frontend{Addr: oldAddr, Port: port, Proto: service.TCP}
	onNew := service.Frontend{Addr: newAddr, Port: port, Proto: service.TCP}
	exists := func(f service.Frontend) bool { _, ok := backendsIn(t, d.Maps(), f); return ok }
	waitFor(t, "the NodePort on the start address", func() bool { return exists(onOld) })
	if exists(onNew) {
		t.Fatalf("NodePort on %s before the node has that address", newAddr)
	}

	node.Addrs = []netip.Addr{oldAddr, newAddr}
	ctl.SetNode(node)
	waitFor(t, "the NodePort on the added address", func() bool { return exists(onNew) })
	if !exists(onOld) {
		t.Fatal("the NodePort on the start address went when another was added")
	}
	node.Addrs = []netip.Addr{newAddr}
	ctl.SetNode(node)
	waitFor(t, "the NodePort gone from the removed address", func() bool { return !exists(onOld) })
	if !exists(onNew) {
		t.Fatal("the NodePort on the remaining address went")
	}
}
