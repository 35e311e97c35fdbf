// Package nsutil runs code inside network namespaces. Product code (the CNI plugin, the
// agent's ENI handling) and tests use it alike.
package nsutil

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// NewAnon creates an anonymous network namespace; the caller owns the handle and must Close
// it. The calling goroutine's namespace is unchanged.
func NewAnon() (netns.NsHandle, error) {
	ch := make(chan struct {
		ns  netns.NsHandle
		err error
	}, 1)
	// netns.New switches the calling thread into the new namespace. Do that on a throwaway
	// locked thread that is never unlocked, so the Go runtime retires the thread instead of
	// reusing it in the wrong namespace — and switch it back first: the runtime cannot retire
	// the process's main thread and parks it for good instead, so a goroutine that happened to
	// run there would pin the new namespace for the life of the process (it could never be
	// destroyed by closing its handles).
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			ch <- struct {
				ns  netns.NsHandle
				err error
			}{0, fmt.Errorf("get current netns: %w", err)}
			return
		}
		defer orig.Close()
		ns, err := netns.New()
		if err == nil {
			_ = netns.Set(orig) // on failure the thread stays locked: retired, or parked if main
		}
		ch <- struct {
			ns  netns.NsHandle
			err error
		}{ns, err}
	}()
	r := <-ch
	if r.err != nil {
		return 0, fmt.Errorf("create network namespace: %w", r.err)
	}
	return r.ns, nil
}

// Do runs fn on a locked OS thread switched into ns, and returns its error. The thread
// is returned to the caller's original namespace afterwards; if that fails the thread is
// left locked so that the runtime discards it.
func Do(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("get current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- ferr // thread stays locked and dies with the goroutine
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
