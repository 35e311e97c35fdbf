package agent

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Limits of the socket server. Every legitimate client is tern-cni, which sends one small
// request at once and waits for the answer, so anything slower or larger is a misbehaving
// client that must not hold the agent's memory, file descriptors or attention.
const (
	// MaxRequestBody caps a request body. The largest real one is a GC listing every
	// attachment of the node (a few hundred bytes per attachment).
	MaxRequestBody = 1 << 20
	// MaxSocketConns caps the connections the socket holds at once (the node runs at most a
	// few hundred pods, and the runtime runs a handful of CNI calls at a time).
	MaxSocketConns = 512

	socketReadHeaderTimeout = 2 * time.Second
	socketReadTimeout       = 5 * time.Second
	socketIdleTimeout       = 5 * time.Second
	// socketWriteTimeout runs from the end of the request headers to the end of the answer,
	// so it covers the handler: an allocation may wait for a refill (allocateWait).
	socketWriteTimeout = 2 * time.Minute
)

// checkSocketPath refuses a socketPath that is not the agent's to remove: the agent replaces
// a stale socket on start, and anything else at that path (the IPAM database, a file an
// operator pointed at by mistake) must survive a config typo.
func checkSocketPath(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socketPath %s: %w", path, err)
	}
	if fi.Mode()&fs.ModeSocket == 0 {
		return fmt.Errorf("socketPath %s exists and is not a socket (mode %s); the agent will not remove it: "+
			"point socketPath at a path of its own (default %s) or move the file away", path, fi.Mode(), DefaultSocketPath)
	}
	// A socket that answers belongs to a running agent: taking it over would split the node
	// between two agents that share one IPAM store.
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("socketPath %s is served by a running process (another tern-agent?); stop it first", path)
	}
	return nil
}

// prepareSocketDir creates the socket's directory, or tightens an existing one, to 0700: the
// socket grants IP allocation to whoever reaches it. A world-writable directory (such as
// /tmp) is refused, since anyone could replace the socket there.
func prepareSocketDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create socket directory %s: %w", dir, err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("socket directory %s: %w", dir, err)
	}
	if fi.Mode()&0o002 != 0 || fi.Mode()&fs.ModeSticky != 0 {
		return fmt.Errorf("socket directory %s is shared (mode %s): give socketPath a directory of its own, e.g. %s",
			dir, fi.Mode(), filepath.Dir(DefaultSocketPath))
	}
	if fi.Mode().Perm() != 0o700 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("chmod 0700 socket directory %s: %w", dir, err)
		}
	}
	return nil
}

// serveSocket listens on the unix socket with mode 0600: whoever can write to it can take
// and release pod addresses, so only root (the runtime running the CNI) may. Each
// connection's peer uid is checked as well (peercred.go).
func (a *Agent) serveSocket() (*http.Server, func(), error) {
	path := a.cfg.SocketPath
	if err := checkSocketPath(path); err != nil {
		return nil, nil, err
	}
	if err := prepareSocketDir(filepath.Dir(path)); err != nil {
		return nil, nil, err
	}
	// A socket left by a killed agent would make Listen fail with EADDRINUSE; checkSocketPath
	// made sure it is a socket nobody serves.
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, nil, fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	// The umask makes bind create the socket 0600 already: no window in which it has the
	// process's default mode. It is process-wide, so it is restored right away; the agent has
	// started nothing else that creates files yet.
	old := unix.Umask(0o177)
	ln, err := net.Listen("unix", path)
	unix.Umask(old)
	if err != nil {
		return nil, nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	// Shutdown must not remove a socket another agent has since created at the path.
	ul := ln.(*net.UnixListener)
	ul.SetUnlinkOnClose(false)
	fi, err := os.Lstat(path)
	if err != nil {
		ln.Close()
		return nil, nil, fmt.Errorf("stat socket %s: %w", path, err)
	}
	ours := fi.Sys().(*syscall.Stat_t).Ino
	remove := func() {
		if fi, err := os.Lstat(path); err == nil && fi.Mode()&fs.ModeSocket != 0 && fi.Sys().(*syscall.Stat_t).Ino == ours {
			_ = os.Remove(path)
		}
	}

	lim := newConnLimiter(a.newPeerCredListener(ln), MaxSocketConns)
	srv := &http.Server{
		Handler:           a.handler(),
		ReadHeaderTimeout: socketReadHeaderTimeout,
		ReadTimeout:       socketReadTimeout,
		WriteTimeout:      socketWriteTimeout,
		IdleTimeout:       socketIdleTimeout,
		MaxHeaderBytes:    16 << 10,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if tc, ok := c.(*trackedConn); ok {
				return context.WithValue(ctx, trackedConnKey{}, tc)
			}
			return ctx
		},
		ErrorLog: zap.NewStdLog(a.log.Named("socket")),
	}
	go func() {
		if err := srv.Serve(lim); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("socket server stopped", zap.Error(err))
		}
	}()
	return srv, remove, nil
}

type trackedConnKey struct{}

// requestRead marks the connection of r as having delivered its whole request, so the
// connection cap no longer evicts it.
func requestRead(r *http.Request) {
	if tc, ok := r.Context().Value(trackedConnKey{}).(*trackedConn); ok {
		tc.delivered.Store(true)
	}
}

// connLimiter caps the open connections of a listener. When the cap is reached it makes room
// by closing the oldest connection that has not yet delivered a complete request: a client
// that trickles its request in loses its place, one that is being answered keeps it, and a
// flood of slow clients cannot keep a real CNI call out. When every connection is being
// answered, the new one is closed instead.
type connLimiter struct {
	net.Listener
	max int

	mu    sync.Mutex
	conns *list.List // of *trackedConn, oldest first
}

func newConnLimiter(ln net.Listener, max int) *connLimiter {
	return &connLimiter{Listener: ln, max: max, conns: list.New()}
}

type trackedConn struct {
	net.Conn
	l         *connLimiter
	elem      *list.Element
	delivered atomic.Bool
	once      sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		c.l.conns.Remove(c.elem)
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}

// Open is how many connections the limiter holds.
func (l *connLimiter) Open() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.conns.Len()
}

func (l *connLimiter) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		l.mu.Lock()
		var victim *trackedConn
		if l.conns.Len() >= l.max {
			for e := l.conns.Front(); e != nil; e = e.Next() {
				if tc := e.Value.(*trackedConn); !tc.delivered.Load() {
					victim = tc
					break
				}
			}
			if victim == nil {
				l.mu.Unlock()
				c.Close()
				continue
			}
		}
		tc := &trackedConn{Conn: c, l: l}
		tc.elem = l.conns.PushBack(tc)
		l.mu.Unlock()
		if victim != nil {
			// Closing it makes its pending read fail, so its goroutine ends.
			victim.Close()
		}
		return tc, nil
	}
}
