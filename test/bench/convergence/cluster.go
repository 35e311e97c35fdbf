package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"
)

const (
	benchNamespace = "bench"
	// managedBy marks our slices as written by the benchmark, so no EndpointSlice
	// controller would consider them its own (none runs here, but the label says why).
	managedBy     = "convergence-bench.tern.invalid"
	endpointsEach = 5
	servicePort   = 80
	targetPort    = 8080
)

// cluster is the benchmark's view of what it wrote: every Service's cluster IP and the
// last version of its one EndpointSlice, so that a change is one Update with no read.
type cluster struct {
	client kubernetes.Interface
	vips   []netip.Addr
	slices []*discoveryv1.EndpointSlice
	rng    *rand.Rand
	nextIP uint32 // changed endpoints come from 100.64.0.0/10, never reused
}

func newCluster(client kubernetes.Interface, seed uint64) *cluster {
	return &cluster{client: client, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

func serviceName(i int) string { return fmt.Sprintf("svc-%05d", i) }

// initialEndpoint is endpoint j of Service i: unique addresses from 172.16.0.0/12.
func initialEndpoint(i, j int) netip.Addr {
	n := uint32(i*endpointsEach + j + 1)
	return netip.AddrFrom4([4]byte{172, byte(16 + n>>16), byte(n >> 8), byte(n)})
}

// grow creates Services (without selectors) and their EndpointSlices until there are n,
// with parallel workers, and returns how long it took.
func (c *cluster) grow(ctx context.Context, n, workers int) (time.Duration, error) {
	start := time.Now()
	if len(c.vips) == 0 {
		_, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: benchNamespace}}, metav1.CreateOptions{})
		if err != nil {
			return 0, fmt.Errorf("create namespace %s: %w", benchNamespace, err)
		}
	}
	from := len(c.vips)
	if n <= from {
		return 0, nil
	}
	c.vips = append(c.vips, make([]netip.Addr, n-from)...)
	c.slices = append(c.slices, make([]*discoveryv1.EndpointSlice, n-from)...)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	next := make(chan int)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				// Each index is written by exactly one worker, so no lock is needed.
				if err := c.create(ctx, i); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
					cancel()
				}
			}
		}()
	}
feed:
	for i := from; i < n; i++ {
		select {
		case next <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if len(errs) > 0 {
		return 0, fmt.Errorf("create Services %d..%d: %w", from, n-1, errors.Join(errs[:min(len(errs), 3)]...))
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

func (c *cluster) create(ctx context.Context, i int) error {
	name := serviceName(i)
	svc, err := c.client.CoreV1().Services(benchNamespace).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{
			Name: "http", Port: servicePort, TargetPort: intstr.FromInt32(targetPort), Protocol: corev1.ProtocolTCP,
		}}},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create Service %s: %w", name, err)
	}
	vip, err := netip.ParseAddr(svc.Spec.ClusterIP)
	if err != nil {
		return fmt.Errorf("Service %s got cluster IP %q: %w", name, svc.Spec.ClusterIP, err)
	}
	eps := make([]discoveryv1.Endpoint, endpointsEach)
	for j := range eps {
		eps[j] = discoveryv1.Endpoint{
			Addresses:  []string{initialEndpoint(i, j).String()},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
		}
	}
	slice, err := c.client.DiscoveryV1().EndpointSlices(benchNamespace).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: name + "-bench", Labels: map[string]string{
			discoveryv1.LabelServiceName: name,
			discoveryv1.LabelManagedBy:   managedBy,
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   eps,
		Ports: []discoveryv1.EndpointPort{{
			Name: ptr.To("http"), Port: ptr.To[int32](targetPort), Protocol: ptr.To(corev1.ProtocolTCP),
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create EndpointSlice for %s: %w", name, err)
	}
	c.vips[i], c.slices[i] = vip, slice
	return nil
}

// change is one EndpointSlice write: endpoint slot of Service svc moves to addr.
type change struct {
	svc     int
	key     string // namespace/name, as kube-proxy logs it
	vip     netip.Addr
	addr    netip.Addr
	written time.Time // taken just before the write; also the trigger-time annotation
	acked   time.Time // when the apiserver answered the write
	seen    time.Time // when the agent under test was seen holding addr; zero if never
	// agentSays is the latency the agent itself reported for this change (kube-proxy's
	// "Network programming" log line, from the same annotation); zero if none.
	agentSays time.Duration
}

func (ch *change) latency() time.Duration { return ch.seen.Sub(ch.written) }

// prepare picks a random Service and endpoint and a never-used address for it. It does
// not write: the caller registers the change with its observer first, so an agent that is
// faster than the Update's own round trip is still timed correctly.
func (c *cluster) prepare() *change {
	i := c.rng.IntN(len(c.slices))
	c.nextIP++
	n := c.nextIP
	return &change{
		svc:  i,
		key:  benchNamespace + "/" + serviceName(i),
		vip:  c.vips[i],
		addr: netip.AddrFrom4([4]byte{100, byte(64 + n>>16&0x3f), byte(n >> 8), byte(n)}),
	}
}

// write replaces a random endpoint of the Service with ch.addr, stamping the
// endpoints.kubernetes.io/last-change-trigger-time annotation with ch.written (which
// kube-proxy's network-programming latency is measured from).
func (c *cluster) write(ctx context.Context, ch *change) error {
	s := c.slices[ch.svc].DeepCopy()
	j := c.rng.IntN(len(s.Endpoints))
	s.Endpoints[j].Addresses = []string{ch.addr.String()}
	ch.written = time.Now()
	if s.Annotations == nil {
		s.Annotations = map[string]string{}
	}
	s.Annotations[corev1.EndpointsLastChangeTriggerTime] = ch.written.UTC().Format(time.RFC3339Nano)
	out, err := c.client.DiscoveryV1().EndpointSlices(benchNamespace).Update(ctx, s, metav1.UpdateOptions{})
	if err != nil {
		return fmt.Errorf("update EndpointSlice %s: %w", s.Name, err)
	}
	ch.acked = time.Now()
	c.slices[ch.svc] = out
	return nil
}

// current reports whether addr is still an endpoint of Service i (a later change may have
// replaced it).
func (c *cluster) current(i int, addr netip.Addr) bool {
	for _, ep := range c.slices[i].Endpoints {
		for _, a := range ep.Addresses {
			if a == addr.String() {
				return true
			}
		}
	}
	return false
}
