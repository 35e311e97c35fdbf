// Command ternsvc is the service half of the tern agent alone, for the convergence
// benchmark: it loads the datapath under a private pin root, runs service/controller
// against a kubeconfig, and logs JSON lines on stdout (the benchmark reads the "full sync"
// line). It runs as its own process so that its resident memory is the agent's, not the
// benchmark's.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/service/controller"
	"github.com/tern-net/tern/service/lbmap"
)

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the apiserver to follow (required)")
	pinRoot := flag.String("pin-root", "", "bpffs directory for the maps, under /sys/fs/bpf (required)")
	keepPins := flag.Bool("keep-pins", false, "leave the pinned maps in place at exit (the benchmark restarts over them)")
	resync := flag.Duration("resync", 5*time.Minute, "full resync interval")
	pprofAddr := flag.String("pprof-addr", "", "serve /debug/pprof/ here (the agent's pprofAddr; test/bench/svcmem reads the heap from it)")
	flag.Parse()
	if err := run(*kubeconfig, *pinRoot, *keepPins, *resync, *pprofAddr); err != nil {
		fmt.Fprintln(os.Stderr, "ternsvc:", err)
		os.Exit(1)
	}
}

func run(kubeconfig, pinRoot string, keepPins bool, resync time.Duration, pprofAddr string) error {
	if kubeconfig == "" || pinRoot == "" {
		return fmt.Errorf("-kubeconfig and -pin-root are required")
	}
	// RemovePins deletes the whole directory: refuse anything but a directory of our own
	// under bpffs, so a typo cannot remove another agent's pins.
	if filepath.Dir(filepath.Clean(pinRoot)) != "/sys/fs/bpf" || !strings.HasPrefix(filepath.Base(pinRoot), "tern-convbench-") {
		return fmt.Errorf("pin root %q: want /sys/fs/bpf/tern-convbench-<something>", pinRoot)
	}
	cfg := zap.NewProductionConfig()
	cfg.OutputPaths = []string{"stdout"}
	cfg.Sampling = nil // the benchmark needs every "full sync" line
	log, err := cfg.Build()
	if err != nil {
		return fmt.Errorf("build logger: %w", err)
	}
	defer log.Sync()
	agent.TuneGC(log) // as tern-agent does

	if pprofAddr != "" {
		addr, err := agent.PprofListenAddr(pprofAddr)
		if err != nil {
			return err
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("listen for pprof: %w", err)
		}
		defer agent.ServePprof(ln, log).Close()
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return fmt.Errorf("read kubeconfig %s: %w", kubeconfig, err)
	}
	// The informers' initial LIST of 10,000 Services and slices is a handful of requests;
	// the default client limits only matter for writes, which this process does not make.
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("build client: %w", err)
	}

	dp, err := loader.Load(loader.Config{PinRoot: pinRoot, Logger: log})
	if err != nil {
		return err
	}
	defer dp.Close()
	if !keepPins {
		defer func() {
			if err := loader.RemovePins(pinRoot); err != nil {
				log.Error("remove pins", zap.Error(err))
			}
		}()
	}
	rec, err := lbmap.NewReconciler(dp.Maps(), log)
	if err != nil {
		return fmt.Errorf("read existing LB maps under %s: %w", pinRoot, err)
	}
	ctl, err := controller.New(client, rec, controller.Options{
		ResyncInterval: resync,
		Registerer:     prometheus.NewRegistry(),
		Logger:         log,
	})
	if err != nil {
		return err
	}
	log.Info("ternsvc running", zap.Int("pid", os.Getpid()), zap.String("pinRoot", pinRoot))
	return ctl.Run(ctx)
}
