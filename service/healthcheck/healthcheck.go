// Package healthcheck answers a LoadBalancer Service's healthCheckNodePort as kube-proxy
// does (k8s.io/kubernetes pkg/proxy/healthcheck, v1.37): for a Service with
// externalTrafficPolicy Local, an HTTP server on every node address at that port says how
// many of the Service's ready endpoints are on this node, 200 when there is at least one
// and the proxy is healthy, 503 otherwise, so that the cloud load balancer sends traffic
// only to nodes that can serve it without leaving the node.
package healthcheck

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/tern-net/tern/service"
)

// Port is the healthCheckNodePort a Service asks for, 0 for none: kube-proxy serves one
// for a LoadBalancer Service with externalTrafficPolicy Local (the apiserver allocates it
// for exactly those).
func Port(svc *corev1.Service) uint16 {
	if svc == nil {
		return 0
	}
	return PortOf((*service.Compactor)(nil).Service(svc))
}

// PortOf is Port of a compact Service (the Compactor kept only a port that applies).
func PortOf(svc *service.Service) uint16 {
	if svc == nil {
		return 0
	}
	return svc.HealthCheckNodePort
}

// LocalReadyEndpoints counts the distinct addresses of a Service's ready endpoints on node,
// as kube-proxy's EndpointsMap.LocalReadyEndpoints does: terminating endpoints do not count
// (a node with only those must fail the check), an address serving several ports counts
// once. IPv4 slices only, like the datapath.
func LocalReadyEndpoints(node string, eps []*discoveryv1.EndpointSlice) int {
	return LocalReady(node, service.CompactSlices(eps))
}

// LocalReady is LocalReadyEndpoints of compact slices. Addresses no backend can have count
// too (kube-proxy counts every address); the Compactor kept them as written.
func LocalReady(node string, eps []*service.Slice) int {
	n, _ := LocalReadyExcept(node, eps, nil)
	return n
}

// LocalReadyExcept is LocalReady without the addresses in except (the node's exclusive-ENI
// pods, which serve no externalTrafficPolicy Local frontend: service.Node.Exclusive), and how
// many local ready addresses it left out for that.
func LocalReadyExcept(node string, eps []*service.Slice, except []netip.Addr) (n, left int) {
	ips := map[netip.Addr]bool{}
	out := map[netip.Addr]bool{}
	var bad map[string]bool
	for _, s := range eps {
		if !s.IPv4 {
			continue
		}
		for i := range s.Endpoints {
			e := &s.Endpoints[i]
			if !e.Ready() || node == "" || e.Node != node {
				continue
			}
			for _, a := range e.Addrs() {
				if slices.Contains(except, a) {
					out[a] = true
					continue
				}
				ips[a] = true
			}
			for _, a := range e.BadAddrs() {
				if bad == nil {
					bad = map[string]bool{}
				}
				bad[a] = true
			}
		}
	}
	return len(ips) + len(bad), len(out)
}

// Server runs the health check servers of every Service that needs one. Update it from
// the service controller; Close stops them all.
type Server struct {
	addrs   []netip.Addr
	healthy func() bool
	log     *zap.Logger

	mu       sync.Mutex
	services map[types.NamespacedName]*instance
}

type instance struct {
	port      uint16
	endpoints int
	servers   []*http.Server
}

// New makes a Server listening on addrs (the node's addresses, as kube-proxy's
// nodePortAddresses) once a Service needs it. healthy reports the proxy's own health
// (serviceProxyHealthy); nil means always healthy.
func New(addrs []netip.Addr, healthy func() bool, log *zap.Logger) *Server {
	if healthy == nil {
		healthy = func() bool { return true }
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &Server{addrs: addrs, healthy: healthy, log: log, services: map[types.NamespacedName]*instance{}}
}

// Update sets a Service's health check port (0: it needs none; its servers stop) and its
// local ready endpoint count. A port that cannot be opened is returned as an error (the
// caller reports it, as kube-proxy records a FailedToStartServiceHealthcheck Event) and
// tried again on the next Update.
func (s *Server) Update(nn types.NamespacedName, port uint16, localEndpoints int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := s.services[nn]
	if cur != nil && cur.port != port {
		cur.close()
		delete(s.services, nn)
		cur = nil
	}
	if port == 0 {
		return nil
	}
	if cur == nil {
		cur = &instance{port: port}
		if err := s.listen(nn, cur); err != nil {
			return err
		}
		s.services[nn] = cur
		s.log.Info("health check node port serving", zap.String("service", nn.String()), zap.Uint16("port", port))
	}
	cur.endpoints = localEndpoints
	return nil
}

func (s *Server) listen(nn types.NamespacedName, in *instance) error {
	if len(s.addrs) == 0 {
		return fmt.Errorf("health check port %d of service %s: the node has no address to listen on", in.port, nn)
	}
	for _, a := range s.addrs {
		addr := netip.AddrPortFrom(a, in.port).String()
		l, err := net.Listen("tcp", addr)
		if err != nil {
			in.close()
			return fmt.Errorf("listen on %s for the health check of service %s (is another process using the port?): %w", addr, nn, err)
		}
		srv := &http.Server{Handler: handler{nn: nn, s: s}, ReadHeaderTimeout: 10 * time.Second}
		in.servers = append(in.servers, srv)
		go func() {
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Warn("health check server stopped", zap.String("service", nn.String()), zap.String("address", addr), zap.Error(err))
			}
		}()
	}
	return nil
}

func (in *instance) close() {
	for _, srv := range in.servers {
		srv.Close()
	}
	in.servers = nil
}

// Ports lists the Services served and their ports (for tests and status).
func (s *Server) Ports() map[types.NamespacedName]uint16 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[types.NamespacedName]uint16, len(s.services))
	for nn, in := range s.services {
		out[nn] = in.port
	}
	return out
}

// Close stops every server.
func (s *Server) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for nn, in := range s.services {
		in.close()
		delete(s.services, nn)
	}
}

type handler struct {
	nn types.NamespacedName
	s  *Server
}

// ServeHTTP answers as kube-proxy's hcHandler: the same headers, status codes and body,
// byte for byte.
func (h handler) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	h.s.mu.Lock()
	in, ok := h.s.services[h.nn]
	count := 0
	if ok {
		count = in.endpoints
	}
	h.s.mu.Unlock()
	if !ok {
		return // closed between accept and now, as kube-proxy answers a closed check
	}
	healthy := h.s.healthy()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("X-Load-Balancing-Endpoint-Weight", strconv.Itoa(count))
	if count != 0 && healthy {
		w.WriteHeader(http.StatusOK)
	} else {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	fmt.Fprint(w, Body(h.nn, count, healthy))
}

// Body is kube-proxy's response body (its dedented template, tabs and all).
func Body(nn types.NamespacedName, localEndpoints int, healthy bool) string {
	return fmt.Sprintf("{\n\t\"service\": {\n\t\t\"namespace\": %q,\n\t\t\"name\": %q\n\t},\n\t\"localEndpoints\": %d,\n\t\"serviceProxyHealthy\": %v\n}",
		nn.Namespace, nn.Name, localEndpoints, healthy)
}
