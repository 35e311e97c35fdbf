// Package testutil holds helpers shared by tests that touch the kernel: a gate for
// privileged tests and throwaway network namespaces.
package testutil

import (
	"os"
	"testing"
)

// RequirePrivileged skips a test that needs root (netns, BPF, netlink) when the process is
// not root. In CI (TERN_PRIVILEGED=1) the test fails instead, so a privileged test cannot
// silently stop running.
func RequirePrivileged(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("TERN_PRIVILEGED") == "1" {
		tb.Fatal("TERN_PRIVILEGED=1 but the test is not running as root: run the suite as root")
	}
	tb.Skip("needs root (set TERN_PRIVILEGED=1 in CI to turn this skip into a failure)")
}

// SkipOrFail skips with reason, except under TERN_PRIVILEGED=1 where a skip is a failure.
// Use it when a kernel feature the test needs is missing.
func SkipOrFail(tb testing.TB, reason string) {
	tb.Helper()
	if os.Getenv("TERN_PRIVILEGED") == "1" {
		tb.Fatalf("required feature missing under TERN_PRIVILEGED=1: %s", reason)
	}
	tb.Skip(reason)
}
