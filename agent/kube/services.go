package kube

import (
	"context"
	"errors"
	"fmt"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/controller"
	"github.com/tern-net/tern/service/healthcheck"
	"github.com/tern-net/tern/service/lbmap"
)

// startServices runs the service load-balancer controller and the healthCheckNodePort
// servers; the "services" readiness component it registers becomes ready after the first full
// Service sync.
func (c *Component) startServices(ctx context.Context, node string) error {
	dp := c.a.Datapath()
	if dp == nil {
		return errors.New("kubernetes component: the datapath is not loaded")
	}
	// The agent's reconciler: it also holds the hostPorts, which Service syncs must keep.
	rec := c.a.ServiceReconciler()
	if rec == nil {
		var err error
		if rec, err = lbmap.NewReconciler(c.a.LBMaps(dp), c.log); err != nil {
			return fmt.Errorf("service reconciler: %w", err)
		}
	}
	// The node is not ready for pods until every Service of the initial list is in the maps:
	// a pod's first packets (DNS, usually) go to ClusterIPs.
	svcReady, err := c.a.Readiness().Register("services", controller.FirstSync{}.String())
	if err != nil {
		return err
	}
	tr := c.translator(ctx, node)
	// healthCheckNodePort servers, on the addresses NodePorts are served on; the proxy is
	// healthy once the first full sync is in the maps.
	c.health = healthcheck.New(tr.Node.Addrs, func() bool { return c.ctl != nil && c.ctl.HasSynced() }, c.log.Named("healthcheck"))
	c.ctl, err = controller.New(c.client, rec, controller.Options{ResyncInterval: c.opts.ServiceResync,
		Translator: tr,
		OnService:  c.serviceHealth,
		Recorder:   c.recorder, Registerer: c.a.Registry(), Logger: c.log,
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
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		if err := c.ctl.Run(ctx); err != nil {
			c.log.Error("service controller stopped", zap.Error(err))
		}
	}()

	return nil
}

// translator says what service translation needs of this node: its name, its zone (read
// once from the Node's topology.kubernetes.io/zone label, as kube-proxy reads it at start;
// without it topology hints are ignored, as kube-proxy ignores them) and the configured
// algorithm defaults (validated with the config).
func (c *Component) translator(ctx context.Context, node string) service.Translator {
	cfg := c.a.Config()
	tr := service.Translator{Node: service.Node{Name: node, Addrs: c.a.NodeAddrs()}, MaglevTableSize: cfg.MaglevTableSize}
	if cfg.LBAlgorithm != "" {
		tr.DefaultAlgorithm, _ = service.ParseAlgorithm(cfg.LBAlgorithm)
	}
	n, err := c.client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		c.log.Warn("cannot read this node's zone: topology hints are ignored until the agent restarts",
			zap.String("node", node), zap.Error(err))
		return tr
	}
	tr.Node.Zone = n.Labels[corev1.LabelTopologyZone]
	return tr
}

// serviceHealth keeps a Service's healthCheckNodePort server (if it needs one) in step
// with its local ready endpoints. A port that cannot be opened becomes a Warning Event, as
// kube-proxy's FailedToStartServiceHealthcheck.
func (c *Component) serviceHealth(nn types.NamespacedName, svc *corev1.Service, eps []*discoveryv1.EndpointSlice) {
	port := healthcheck.Port(svc)
	if err := c.health.Update(nn, port, healthcheck.LocalReadyEndpoints(c.a.Config().NodeName, eps)); err != nil {
		c.log.Error("health check node port not served", zap.String("service", nn.String()), zap.Error(err))
		if svc != nil {
			c.recorder.Eventf(svc, corev1.EventTypeWarning, "FailedToStartServiceHealthcheck", "%v", err)
		}
	}
}
