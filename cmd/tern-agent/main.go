// Command tern-agent is tern's node agent: it serves IPAM and datapath attachment to tern-cni
// over a unix socket and, given a kubeconfig, load-balances Services in eBPF and reports the
// node's IPAM state on its Node. The configuration comes from a JSON file (see agent.Config and
// docs/cni.md); a few flags override it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/agent/kube"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "tern-agent:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) > 0 && args[0] == "install-cni" {
		return installCNI(args[1:])
	}
	fs := flag.NewFlagSet("tern-agent", flag.ContinueOnError)
	configPath := fs.String("config", "", "agent config file (JSON)")
	nodeName := fs.String("node-name", "", "override nodeName")
	instanceID := fs.String("instance-id", "", "override instanceID")
	socket := fs.String("socket", "", "override socketPath")
	kubeconfig := fs.String("kubeconfig", "", "override kubeconfig (none: IPAM-only)")
	metricsAddr := fs.String("metrics-addr", "", "override metricsAddr, e.g. $(HOST_IP):9464 to serve /metrics, /healthz and /readyz on the node's internal address only")
	daemonMode := fs.String("daemon-mode", "", "override daemonMode: ENIMultiIP or VPC (Terway's --daemon-mode flag, same spelling)")
	debug := fs.Bool("debug", false, "log at debug level")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var cfg agent.Config
	if *configPath != "" {
		c, err := agent.LoadConfig(*configPath)
		if err != nil {
			return err
		}
		cfg = c
	}
	for dst, v := range map[*string]string{&cfg.NodeName: *nodeName, &cfg.InstanceID: *instanceID,
		&cfg.SocketPath: *socket, &cfg.Kubeconfig: *kubeconfig, &cfg.MetricsAddr: *metricsAddr, &cfg.DaemonMode: *daemonMode} {
		if v != "" {
			*dst = v
		}
	}
	if cfg.NodeName == "" && *configPath == "" {
		return errors.New("-config (or at least -node-name and -instance-id) is required")
	}

	zc := zap.NewProductionConfig()
	if *debug {
		zc.Level = zap.NewAtomicLevelAt(zapcore.DebugLevel)
	}
	log, err := zc.Build()
	if err != nil {
		return fmt.Errorf("build logger: %w", err)
	}
	defer func() { _ = log.Sync() }()
	agent.TuneGC(log)

	a, err := agent.New(cfg, log)
	if err != nil {
		return err
	}
	if cfg.Kubeconfig != "" {
		rc, err := clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
		if err != nil {
			return fmt.Errorf("read kubeconfig %s: %w", cfg.Kubeconfig, err)
		}
		rc.UserAgent = "tern-agent/" + cfg.NodeName
		// Protobuf, as kube-proxy and the kubelet ask for: every type the agent watches is
		// built in, and decoding a LIST of 10,000 Services and EndpointSlices from JSON
		// costs several times the garbage (and so the peak heap) that protobuf does.
		rc.ContentType = "application/vnd.kubernetes.protobuf"
		rc.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
		if err := kube.InstrumentAPIClient(rc, a.Registry(), log); err != nil {
			return fmt.Errorf("kubernetes client metrics: %w", err)
		}
		client, err := kubernetes.NewForConfig(rc)
		if err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		dyn, err := dynamic.NewForConfig(rc)
		if err != nil {
			return fmt.Errorf("kubernetes dynamic client: %w", err)
		}
		// The fixed-IP wrapper goes on the pool before Run starts it; the component built in
		// Run gives it its informers.
		fixed := kube.NewFixedIPs(dyn, cfg.NodeName, time.Duration(cfg.FixedIPHoldTime), log)
		a.WrapAllocator(fixed.Wrap)
		a.AddComponent(func(d agent.Deps) (agent.Component, error) {
			return kube.New(d, client, kube.Options{Fixed: fixed}, log)
		})
	} else {
		log.Info("no kubeconfig: IPAM-only (no service load balancing, no Node report)")
	}
	return a.Run(ctx)
}
