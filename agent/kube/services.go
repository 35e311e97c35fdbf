package kube

import (
	"context"
	"sync"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/record"

	"github.com/tern-net/tern/agent"

	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/controller"
	"github.com/tern-net/tern/service/healthcheck"
)

// serviceLB is the service load-balancer job: the controller that writes Services and their
// EndpointSlices into the LB maps (through the agent's reconciler), and the
// healthCheckNodePort servers of eTP Local Services.
type serviceLB struct {
	deps     agent.Deps
	client   kubernetes.Interface
	recorder record.EventRecorder
	resync   time.Duration
	log      *zap.Logger

	ctl       *controller.Controller
	health    *healthcheck.Server
	exclusive *exclusiveLocal // eTP Local and exclusive-ENI pods (exclusive_local.go)
	nodeMu    sync.Mutex
	node      service.Node // what the controller was last told of this node (nodewatch.go)
	cancel    context.CancelFunc
	wg        sync.WaitGroup
}

// Start runs the controller and the health servers; the "services" readiness component it
// registers becomes ready after the first full Service sync.
func (s *serviceLB) Start(ctx context.Context, node string) error {
	ctx, s.cancel = context.WithCancel(ctx)
	// The agent's reconciler: it also holds the hostPorts, which Service syncs must keep.
	rec := s.deps.Services
	// The node is not ready for pods until every Service of the initial list is in the maps:
	// a pod's first packets (DNS, usually) go to ClusterIPs.
	svcReady, err := s.deps.Readiness.Register("services", controller.FirstSync{}.String())
	if err != nil {
		return err
	}
	tr := s.translator(ctx, node)
	tr.Node.Exclusive = exclusiveAddrs(s.deps)
	// The health servers read it from the controller's first sync on (serviceHealth).
	s.nodeMu.Lock()
	s.node = tr.Node
	s.nodeMu.Unlock()
	if s.exclusive, err = newExclusiveLocal(s.deps.Registry); err != nil {
		return err
	}
	// healthCheckNodePort servers, on the addresses NodePorts are served on; the proxy is
	// healthy once the first full sync is in the maps.
	s.health = healthcheck.New(tr.Node.Addrs, func() bool { return s.ctl != nil && s.ctl.HasSynced() }, s.log.Named("healthcheck"))
	s.ctl, err = controller.New(s.client, rec, controller.Options{ResyncInterval: s.resync,
		Translator: tr,
		OnService:  s.serviceHealth,
		Recorder:   s.recorder, Registerer: s.deps.Registry, Logger: s.log,
		Progress: func(p controller.FirstSync) {
			if p.Done {
				svcReady.Ready()
			} else {
				svcReady.NotReady(p.String())
			}
		}})
	if err != nil {
		return err
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.ctl.Run(ctx); err != nil {
			s.log.Error("service controller stopped", zap.Error(err))
		}
	}()
	s.followNode(ctx, tr.Node)
	s.followExclusive()
	return nil
}

// Stop ends the controller and closes the health servers. The maps stay as they are.
func (s *serviceLB) Stop() {
	if s.cancel != nil {
		s.cancel()
	}
	s.wg.Wait()
	if s.health != nil {
		s.health.Close()
	}
}

// translator says what service translation needs of this node at start: its name, its
// addresses, its zone (the Node's topology.kubernetes.io/zone label; without it topology
// hints are ignored, as kube-proxy ignores them) and the configured algorithm defaults
// (validated with the config). followNode keeps the addresses and the zone current.
func (s *serviceLB) translator(ctx context.Context, node string) service.Translator {
	cfg := s.deps.Config
	tr := service.Translator{Node: service.Node{Name: node, Addrs: s.deps.NodeAddrs()}, MaglevTableSize: cfg.MaglevTableSize}
	if cfg.LBAlgorithm != "" {
		tr.DefaultAlgorithm, _ = service.ParseAlgorithm(cfg.LBAlgorithm)
	}
	n, err := s.client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		s.log.Warn("cannot read this node's zone: topology hints are ignored until the Node watch sees it",
			zap.String("node", node), zap.Error(err))
		return tr
	}
	tr.Node.Zone = n.Labels[corev1.LabelTopologyZone]
	return tr
}

// serviceHealth keeps a Service's healthCheckNodePort server (if it needs one) in step
// with its local ready endpoints. A port that cannot be opened becomes a Warning Event, as
// kube-proxy's FailedToStartServiceHealthcheck.
func (s *serviceLB) serviceHealth(nn types.NamespacedName, svc *service.Service, eps []*service.Slice) {
	port := healthcheck.PortOf(svc)
	if err := s.health.Update(nn, port, s.localReady(nn, svc, eps)); err != nil {
		s.log.Error("health check node port not served", zap.String("service", nn.String()), zap.Error(err))
		if svc != nil {
			s.recorder.Eventf(svc.Ref(), corev1.EventTypeWarning, "FailedToStartServiceHealthcheck", "%v", err)
		}
	}
}
