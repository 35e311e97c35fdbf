// Package nsbridge makes a TCP service on the root namespace's loopback reachable on the
// same loopback address inside another network namespace.
//
// In the lab, agents run in node namespaces but the apiserver and the cloud emulator listen
// on 127.0.0.1 in the root namespace, which the lab never routes to. A listening socket stays
// bound to the namespace it was created in, so the bridge creates its listener on a thread
// switched into the node namespace and serves it from ordinary goroutines, dialling the
// target from the root namespace. Kubeconfigs and endpoints written for the root namespace
// (https://127.0.0.1:6443, say) then work unchanged inside the node, certificates included.
package nsbridge

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"

	"github.com/tern-net/tern/internal/nsutil"
)

// Config says what to bridge.
type Config struct {
	// NS is the namespace to listen in. The bridge does not take ownership of the handle.
	NS netns.NsHandle
	// Target is host:port of the service, dialled from the caller's (root) namespace.
	Target string
	// Listen is host:port to listen on inside NS; empty means the same as Target.
	Listen string
	// DialTimeout bounds each dial to Target; default 5 s.
	DialTimeout time.Duration
	// Logger receives connection errors; nil means no logs.
	Logger *zap.Logger
}

// Bridge is a running listener inside a namespace that proxies to a target outside it.
type Bridge struct {
	ln      net.Listener
	target  string
	timeout time.Duration
	log     *zap.Logger
	ctx     context.Context
	cancel  context.CancelFunc

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// Start listens on cfg.Listen (default cfg.Target) inside cfg.NS and proxies every accepted
// connection to cfg.Target. It brings the namespace's loopback up if it is down, because a
// fresh namespace has it down and nothing could listen on 127.0.0.1 otherwise.
func Start(cfg Config) (*Bridge, error) {
	if cfg.Listen == "" {
		cfg.Listen = cfg.Target
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if _, _, err := net.SplitHostPort(cfg.Target); err != nil {
		return nil, fmt.Errorf("nsbridge target %q: want host:port: %w", cfg.Target, err)
	}
	var ln net.Listener
	err := nsutil.Do(cfg.NS, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("find loopback: %w", err)
		}
		if lo.Attrs().Flags&net.FlagUp == 0 {
			if err := netlink.LinkSetUp(lo); err != nil {
				return fmt.Errorf("bring loopback up: %w", err)
			}
		}
		ln, err = net.Listen("tcp", cfg.Listen)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("nsbridge: listen on %s inside namespace %s: %w", cfg.Listen, cfg.NS, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := &Bridge{
		ln:      ln,
		target:  cfg.Target,
		timeout: cfg.DialTimeout,
		log:     cfg.Logger.With(zap.String("component", "nsbridge"), zap.String("listen", ln.Addr().String()), zap.String("target", cfg.Target)),
		ctx:     ctx,
		cancel:  cancel,
		conns:   map[net.Conn]struct{}{},
	}
	b.wg.Add(1)
	go b.serve()
	return b, nil
}

// Addr is the listening address inside the namespace.
func (b *Bridge) Addr() net.Addr { return b.ln.Addr() }

// Close stops listening, cuts every proxied connection and waits for the proxy goroutines.
func (b *Bridge) Close() error {
	b.cancel()
	err := b.ln.Close()
	b.mu.Lock()
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

func (b *Bridge) serve() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			if b.ctx.Err() == nil {
				b.log.Error("accept failed; bridge stops", zap.Error(err))
			}
			return
		}
		if !b.track(c) {
			c.Close()
			return
		}
		b.wg.Add(1)
		go b.proxy(c)
	}
}

// track registers c so Close can cut it; false means the bridge is closing.
func (b *Bridge) track(c net.Conn) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ctx.Err() != nil {
		return false
	}
	b.conns[c] = struct{}{}
	return true
}

func (b *Bridge) untrack(c net.Conn) {
	b.mu.Lock()
	delete(b.conns, c)
	b.mu.Unlock()
	c.Close()
}

func (b *Bridge) proxy(in net.Conn) {
	defer b.wg.Done()
	defer b.untrack(in)
	// Dialled from an ordinary goroutine, hence from the caller's namespace.
	d := net.Dialer{Timeout: b.timeout}
	out, err := d.DialContext(b.ctx, "tcp", b.target)
	if err != nil {
		if b.ctx.Err() == nil {
			b.log.Warn("dial target failed; dropping connection", zap.Stringer("peer", in.RemoteAddr()), zap.Error(err))
		}
		return
	}
	if !b.track(out) {
		out.Close()
		return
	}
	defer b.untrack(out)

	// Copy both ways and pass half-closes on, so request/response protocols that signal
	// the end of a request by shutting down their write side keep working.
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		defer func() { done <- struct{}{} }()
		if _, err := io.Copy(dst, src); err != nil {
			// A reset or a failed write: the other direction cannot finish cleanly either.
			in.Close()
			out.Close()
			return
		}
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
	}
	go pipe(out, in)
	go pipe(in, out)
	<-done
	<-done
}
