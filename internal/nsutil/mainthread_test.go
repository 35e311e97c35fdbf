//go:build linux

package nsutil_test

import (
	"fmt"
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
)

// mainThreadResult is what TestMain saw when it made NewAnon's goroutine run on the
// process's main thread; TestNewAnonLeavesTheMainThreadOut reports it.
var mainThreadResult error

// TestMain makes NewAnon's throwaway goroutine run on the process's main thread, before any
// test: TestMain runs on the main goroutine, which starts there, and with a single P the
// goroutine NewAnon starts runs on the same thread while the caller waits for it. The runtime
// cannot end the main thread when that goroutine exits locked: it parks it for good, in
// whatever namespace it was left in.
func TestMain(m *testing.M) {
	if os.Geteuid() == 0 {
		mainThreadResult = newAnonOnMainThread()
	}
	os.Exit(m.Run())
}

func newAnonOnMainThread() error {
	if unix.Gettid() != unix.Getpid() {
		return fmt.Errorf("TestMain does not run on the main thread (tid %d, pid %d): the case cannot be arranged", unix.Gettid(), unix.Getpid())
	}
	prev := runtime.GOMAXPROCS(1)
	defer runtime.GOMAXPROCS(prev)
	ns, err := nsutil.NewAnon()
	if err != nil {
		return err
	}
	defer ns.Close()
	var created, mainNS unix.Stat_t
	if err := unix.Fstat(int(ns), &created); err != nil {
		return err
	}
	if err := unix.Stat(fmt.Sprintf("/proc/%d/task/%d/ns/net", unix.Getpid(), unix.Getpid()), &mainNS); err != nil {
		return err
	}
	if created.Ino == mainNS.Ino {
		return fmt.Errorf("the main thread is left in the namespace NewAnon created (net:[%d]): it holds it until the process ends", created.Ino)
	}
	return nil
}

// TestNewAnonLeavesTheMainThreadOut: a namespace NewAnon created must go when its handles
// are closed, even when NewAnon's goroutine ran on the main thread (a lab node's namespace
// lingered after Node.Crash, held by the test binary's main thread).
func TestNewAnonLeavesTheMainThreadOut(t *testing.T) {
	testutil.RequirePrivileged(t)
	if mainThreadResult != nil {
		t.Fatal(mainThreadResult)
	}
}
