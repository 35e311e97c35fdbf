package testutil

import (
	"testing"

	"github.com/vishvananda/netns"

	"github.com/tern-net/tern/internal/nsutil"
)

// NewNetNS creates an anonymous network namespace that lives as long as the returned handle
// is open. The handle is closed (and so the namespace destroyed, once nothing else holds it)
// when the test ends. The caller's thread namespace is left unchanged.
func NewNetNS(tb testing.TB) netns.NsHandle {
	tb.Helper()
	ns, err := nsutil.NewAnon()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ns.Close() })
	return ns
}
