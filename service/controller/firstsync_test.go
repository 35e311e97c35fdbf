package controller_test

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap/zaptest"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/controller"
	"github.com/tern-net/tern/service/lbmap"
)

// gatedMaps are the real maps whose frontend writes wait at a gate the test opens: a
// reconciler made slow at the one step that makes a Service reachable.
type gatedMaps struct {
	*loader.Maps
	once    sync.Once
	blocked chan struct{} // closed when the first frontend write arrives
	release chan struct{} // closed by the test to let writes through
}

func (g *gatedMaps) wait() {
	g.once.Do(func() { close(g.blocked) })
	<-g.release
}

func (g *gatedMaps) PutService(k loader.ServiceKey, v loader.ServiceValue) error {
	g.wait()
	return g.Maps.PutService(k, v)
}

func (g *gatedMaps) PutServices(k []loader.ServiceKey, v []loader.ServiceValue) error {
	g.wait()
	return g.Maps.PutServices(k, v)
}

// createServices creates n single-port Services in ns with a few parallel clients and
// returns every frontend they have.
func createServices(t *testing.T, ctx context.Context, client kubernetes.Interface, ns string, n int) []service.Frontend {
	t.Helper()
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		out   []service.Frontend
		errs  []error
		wg    sync.WaitGroup
		names = make(chan int)
	)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range names {
				s, err := client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
					ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("s%04d", i)},
					Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 53, Protocol: corev1.ProtocolUDP}}},
				}, metav1.CreateOptions{})
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				} else {
					out = append(out, service.Frontend{Addr: netip.MustParseAddr(s.Spec.ClusterIP), Port: 53, Proto: service.UDP})
				}
				mu.Unlock()
			}
		}()
	}
	for i := range n {
		names <- i
	}
	close(names)
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("create %d Services: %d failed, first: %v", n, len(errs), errs[0])
	}
	return out
}

// The first sync is done only when every Service of the initial list is in the maps: while
// the reconciler is held at its first frontend write, HasSynced is false and the progress
// says what is being written; once HasSynced is true, every frontend is in the kernel's map.
func TestFirstSyncIsDoneOnlyWhenEveryServiceIsInTheMaps(t *testing.T) {
	testutil.RequirePrivileged(t)
	cp := startControlPlane(t)
	client := kubernetes.NewForConfigOrDie(cp.RestConfig())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	const n = 300
	fronts := createServices(t, ctx, client, "many", n)

	d := loadertest.New(t, loader.Config{})
	g := &gatedMaps{Maps: d.Maps(), blocked: make(chan struct{}), release: make(chan struct{})}
	rec, err := lbmap.NewReconciler(g, nil)
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu      sync.Mutex
		reports []controller.FirstSync
	)
	ctl, err := controller.New(client, rec, controller.Options{Logger: zaptest.NewLogger(t),
		Progress: func(p controller.FirstSync) {
			mu.Lock()
			reports = append(reports, p)
			mu.Unlock()
		}})
	if err != nil {
		t.Fatal(err)
	}
	if ctl.HasSynced() {
		t.Fatal("HasSynced before Run")
	}
	done := make(chan error, 1)
	go func() { done <- ctl.Run(ctx) }()
	released := false
	defer func() {
		if !released {
			close(g.release)
		}
		cancel()
		<-done
	}()

	<-g.blocked
	if ctl.HasSynced() {
		t.Fatal("HasSynced while the reconciler has not written a single frontend")
	}
	mu.Lock()
	last := reports[len(reports)-1]
	mu.Unlock()
	// n Services and the apiserver's own "kubernetes".
	if last.Done || last.Services != n+1 || last.Frontends != n+1 || last.Translated != n+1 ||
		!strings.Contains(last.String(), fmt.Sprintf("writing %d frontends of %d Services", n+1, n+1)) {
		t.Fatalf("progress while the frontends are being written: %+v (%q)", last, last.String())
	}
	close(g.release)
	released = true

	waitFor(t, "the first sync", ctl.HasSynced)
	svcs, err := d.Maps().DumpServices()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fronts {
		k := loader.ServiceKey{Addr: loader.AddrToBE(f.Addr), Port: loader.PortToBE(f.Port), Proto: uint8(f.Proto)}
		if _, ok := svcs[k]; !ok {
			t.Fatalf("HasSynced, but frontend %s is not in the service map (%d of %d there)", f, len(svcs), n+1)
		}
	}

	mu.Lock()
	defer mu.Unlock()
	final := reports[len(reports)-1]
	if !final.Done || final.Err != nil {
		t.Fatalf("last progress report %+v, want Done", final)
	}
	var sawTranslating bool
	for _, p := range reports {
		sawTranslating = sawTranslating || p.ServicesListed && p.SlicesListed && p.Translated > 0 && p.Translated < p.Services
	}
	if !sawTranslating {
		t.Errorf("no report of translation in progress over %d Services: %+v", n+1, reports)
	}
	t.Logf("%d progress reports, last before the writes: %q", len(reports), last.String())
}
