package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netns"
)

// The load generator runs inside the benchmark process: each worker is a goroutine locked
// to an OS thread that has switched into the client's network namespace for good, so every
// socket it opens is the client's (a socket belongs to the namespace of the thread that
// created it). The thread is never unlocked: when the worker returns, the runtime destroys
// it instead of reusing a thread that sits in a foreign namespace.

// inNS runs n workers, worker i calling fn(i) on a thread inside ns, and waits for them.
func inNS(ns netns.NsHandle, n int, fn func(i int)) error {
	var wg sync.WaitGroup
	errc := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			if err := netns.Set(ns); err != nil {
				errc <- fmt.Errorf("enter the client's namespace: %w", err)
				return
			}
			fn(i)
		}()
	}
	wg.Wait()
	close(errc)
	return <-errc
}

// maxErrorShare is how many failed connections a measurement tolerates before it counts as
// failed. Below it the failures are reported with the rate (each costs its 2 s dial timeout
// to the rate already, so a datapath that drops connections cannot look fast).
const maxErrorShare = 0.1

// connRate opens, uses and closes connections for d with `workers` sequential clients and
// returns completed connections per second. One connection is connect, read the server's
// greeting, send a line, read its echo, close. The close is an abortive one (SO_LINGER 0,
// an RST), so that a client making thousands of connections a second to one address does
// not run out of ephemeral ports to TIME_WAIT; every datapath sees the same sequence.
// targets are used round-robin (several only for the no-Service client, which balances
// itself).
func connRate(ns netns.NsHandle, targets []string, workers int, d time.Duration) (rate float64, failures int, _ error) {
	done := make([]int, workers)
	failed := make([]int, workers)
	var firstErr error
	var mu sync.Mutex
	start := time.Now()
	end := start.Add(d)
	err := inNS(ns, workers, func(w int) {
		buf := make([]byte, 256)
		for j := w; time.Now().Before(end); j++ {
			if err := oneExchange(targets[j%len(targets)], buf); err != nil {
				failed[w]++
				mu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
				continue
			}
			done[w]++
		}
	})
	elapsed := time.Since(start)
	if err != nil {
		return 0, 0, err
	}
	ok, bad := sum(done), sum(failed)
	if float64(bad) > maxErrorShare*float64(ok+bad) {
		return 0, bad, fmt.Errorf("%d of %d connections failed (first: %v)", bad, ok+bad, firstErr)
	}
	return float64(ok) / elapsed.Seconds(), bad, nil
}

func oneExchange(addr string, buf []byte) error {
	c, err := net.DialTimeout("tcp4", addr, 2*time.Second)
	if err != nil {
		return err
	}
	tc := c.(*net.TCPConn)
	defer tc.Close()
	_ = tc.SetLinger(0)
	_ = tc.SetDeadline(time.Now().Add(2 * time.Second))
	if err := readLine(tc, buf); err != nil {
		return fmt.Errorf("greeting from %s: %w", addr, err)
	}
	if _, err := tc.Write([]byte("x\n")); err != nil {
		return err
	}
	if err := readLine(tc, buf); err != nil {
		return fmt.Errorf("echo from %s: %w", addr, err)
	}
	return nil
}

// readLine reads until a newline; the server writes each line in one write, so it arrives
// in one segment and this is one read in practice.
func readLine(c net.Conn, buf []byte) error {
	n := 0
	for {
		m, err := c.Read(buf[n:])
		n += m
		if n > 0 && buf[n-1] == '\n' {
			return nil
		}
		if err != nil {
			return err
		}
		if n == len(buf) {
			return errors.New("line longer than the buffer")
		}
	}
}

// rrResult is a kept-alive request rate with its latency percentiles.
type rrResult struct {
	rate     float64
	p50, p99 time.Duration
	// Requests slower than 1 ms, and how many distinct 10 ms windows of the run they fall
	// in: stalls that hit every connection at once (the machine) share windows, a flow's
	// own slow path would not.
	slow, slowWindows int
}

// keepAlive opens `conns` connections (connection i to targets[i%len]) and, on each, sends
// a line and waits for its echo, back to back, for d. Every request's round trip is kept for
// the percentiles.
func keepAlive(ns netns.NsHandle, targets []string, conns int, d time.Duration) (rrResult, error) {
	lat := make([][]time.Duration, conns)
	slowAt := make([][]time.Duration, conns) // when (since start) each slow request began
	errs := make([]error, conns)
	start := time.Now()
	end := start.Add(d)
	err := inNS(ns, conns, func(w int) {
		addr := targets[w%len(targets)]
		c, err := net.DialTimeout("tcp4", addr, 2*time.Second)
		if err != nil {
			errs[w] = err
			return
		}
		defer c.Close()
		buf := make([]byte, 256)
		_ = c.SetDeadline(end.Add(2 * time.Second))
		if err := readLine(c, buf); err != nil {
			errs[w] = fmt.Errorf("greeting from %s: %w", addr, err)
			return
		}
		l := make([]time.Duration, 0, 65536)
		msg := []byte("ping\n")
		for t0 := time.Now(); t0.Before(end); t0 = time.Now() {
			if _, err := c.Write(msg); err != nil {
				errs[w] = err
				return
			}
			if err := readLine(c, buf); err != nil {
				errs[w] = fmt.Errorf("echo from %s: %w", addr, err)
				return
			}
			rt := time.Since(t0)
			l = append(l, rt)
			if rt > time.Millisecond {
				slowAt[w] = append(slowAt[w], t0.Sub(start))
			}
		}
		lat[w] = l
	})
	elapsed := time.Since(start)
	if err == nil {
		err = errors.Join(errs...)
	}
	if err != nil {
		return rrResult{}, err
	}
	all := slices.Concat(lat...)
	if len(all) == 0 {
		return rrResult{}, errors.New("no request completed")
	}
	slices.Sort(all)
	windows := map[time.Duration]bool{}
	slow := 0
	for _, at := range slowAt {
		slow += len(at)
		for _, t := range at {
			windows[t/(10*time.Millisecond)] = true
		}
	}
	return rrResult{rate: float64(len(all)) / elapsed.Seconds(), p50: all[len(all)/2], p99: all[len(all)*99/100],
		slow: slow, slowWindows: len(windows)}, nil
}

// stream sends as fast as it can on one connection to a sink for d and returns Gbit/s of
// payload the sender got into the kernel (the socket buffers it may still hold at the end
// are a few MB against gigabytes).
func stream(ns netns.NsHandle, target string, d time.Duration) (float64, error) {
	var sent int64
	var serr error
	start := time.Now()
	err := inNS(ns, 1, func(int) {
		c, err := net.DialTimeout("tcp4", target, 2*time.Second)
		if err != nil {
			serr = err
			return
		}
		defer c.Close()
		buf := make([]byte, 256<<10)
		end := time.Now().Add(d)
		_ = c.SetWriteDeadline(end)
		for time.Now().Before(end) {
			n, err := c.Write(buf)
			sent += int64(n)
			if err != nil {
				// The write deadline ending the stream is the expected way out.
				if ne, ok := errors.AsType[net.Error](err); !ok || !ne.Timeout() {
					serr = err
				}
				return
			}
		}
	})
	elapsed := time.Since(start)
	if err == nil {
		err = serr
	}
	if err != nil {
		return 0, fmt.Errorf("stream to %s: %w", target, err)
	}
	return float64(sent) * 8 / elapsed.Seconds() / 1e9, nil
}

// sink accepts connections on ln and discards what they send.
func sink(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			_, _ = io.Copy(io.Discard, c)
		}()
	}
}

func sum(xs []int) int {
	t := 0
	for _, x := range xs {
		t += x
	}
	return t
}
