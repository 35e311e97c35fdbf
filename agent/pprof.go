package agent

import (
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"strconv"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// PprofListenAddr resolves the pprofAddr option to the address to listen on. Empty means
// off (""). A bare port (":6060" or "6060") listens on 127.0.0.1 only: profiles are for an
// operator on the node (or `kubectl port-forward`, which reaches the host-network agent's
// loopback), not for the network. A host given explicitly is used as it is.
func PprofListenAddr(s string) (string, error) {
	if s == "" {
		return "", nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		// "6060": a port alone.
		host, port = "", s
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return "", fmt.Errorf("pprofAddr %q is not a port or host:port with a port 1-65535: use e.g. \"6060\" (loopback) or \"127.0.0.1:6060\", or leave it out to serve no profiles", s)
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}

func (a *Agent) servePprof() (*http.Server, error) {
	addr, err := PprofListenAddr(a.cfg.PprofAddr)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen for pprof on %s: %w (pprofAddr)", addr, err)
	}
	if tcp, ok := ln.Addr().(*net.TCPAddr); ok && !tcp.IP.IsLoopback() {
		a.log.Warn("pprofAddr listens beyond loopback: anyone who reaches it can read the agent's profiles and load its CPU",
			zap.String("addr", ln.Addr().String()))
	}
	a.log.Info("serving Go profiles", zap.String("addr", ln.Addr().String()), zap.String("path", "/debug/pprof/"))
	return ServePprof(ln, a.log), nil
}

// ServePprof serves Go's runtime profiles under /debug/pprof/ on ln until the returned
// server is closed: heap, allocs, goroutine, threadcreate, block, mutex, profile (CPU) and
// trace. /debug/pprof/cmdline is left out on purpose: it answers the process's arguments,
// which are none of a profile reader's business. The handlers are mounted on a mux of our
// own, not net/http's default one.
func ServePprof(ln net.Listener, log *zap.Logger) *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index) // index and the named profiles (heap, goroutine, ...)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("/debug/pprof/cmdline", http.NotFound)
	// A CPU profile or trace runs for ?seconds= (30 by default): no write timeout.
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	if l, err := zap.NewStdLogAt(log.Named("pprof"), zapcore.DebugLevel); err == nil {
		srv.ErrorLog = l
	}
	go func() {
		if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed {
			log.Error("pprof listener stopped", zap.String("addr", ln.Addr().String()), zap.Error(err))
		}
	}()
	return srv
}
