// Command ecs-emulator serves the emulated Alibaba Cloud ECS/VPC OpenAPI (package
// test/ecsemu) on a loopback address, for the lab and for manual runs with the real SDK or
// the aliyun CLI. With vpc.netnsPath set in the config it also drives the network namespaces
// named there (ENIs become veth links); -no-sdn serves the API alone.
//
// One listener serves everything: the OpenAPI at "/", the emulator controls under
// /_emulator/ (faults, state, latency) and each instance's metadata service at
// /_emulator/metadata/<instance-id>/latest/meta-data/... .
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/tern-net/tern/test/ecsemu"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "ecs-emulator:", err)
		os.Exit(1)
	}
}

// run parses flags, serves until ctx ends, then shuts down and unplugs every ENI. It prints
// "listening on ADDR" to out once the listener is bound, so callers can use -listen with port 0.
func run(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("ecs-emulator", flag.ContinueOnError)
	configPath := fs.String("config", "", "emulator config (JSON, see test/ecsemu/testdata/lab.json)")
	listen := fs.String("listen", "127.0.0.1:0", "loopback address to serve on")
	noSDN := fs.Bool("no-sdn", false, "serve the API only, even if the config names network namespaces")
	debug := fs.Bool("debug", false, "log every call")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *configPath == "" {
		return errors.New("-config is required")
	}
	host, _, err := net.SplitHostPort(*listen)
	if err != nil {
		return fmt.Errorf("-listen %q: %w", *listen, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("-listen %q is not a loopback address: the emulator serves only 127.0.0.1/::1", *listen)
	}
	lvl := zapcore.InfoLevel
	if *debug {
		lvl = zapcore.DebugLevel
	}
	zc := zap.NewProductionConfig()
	zc.Level = zap.NewAtomicLevelAt(lvl)
	log, err := zc.Build()
	if err != nil {
		return fmt.Errorf("build logger: %w", err)
	}
	defer func() { _ = log.Sync() }()

	cfg, err := ecsemu.LoadConfig(*configPath)
	if err != nil {
		return err
	}
	opts := []ecsemu.Option{ecsemu.WithLogger(log)}
	if cfg.VPC.NetNSPath != "" && !*noSDN {
		sdn, err := ecsemu.NewNetnsSDNFromConfig(cfg, log)
		if err != nil {
			return fmt.Errorf("set up the SDN (or pass -no-sdn): %w", err)
		}
		defer func() {
			if err := sdn.Close(); err != nil {
				log.Error("close SDN", zap.Error(err))
			}
		}()
		opts = append(opts, ecsemu.WithSDN(sdn))
	}
	emu, err := ecsemu.New(cfg, opts...)
	if err != nil {
		return err
	}
	defer func() {
		if err := emu.Close(); err != nil {
			log.Error("close emulator", zap.Error(err))
		}
	}()

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", *listen, err)
	}
	srv := &http.Server{Handler: emu.Handler(), ReadHeaderTimeout: 10 * time.Second}
	fmt.Fprintf(out, "listening on %s\n", ln.Addr())
	log.Info("ECS/VPC emulator serving", zap.String("addr", ln.Addr().String()),
		zap.String("region", cfg.RegionID), zap.Int("instances", len(cfg.Instances)))
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shut down the HTTP server: %w", err)
	}
	return nil
}
