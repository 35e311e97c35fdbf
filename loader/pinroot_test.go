package loader_test

import (
	"os"
	"testing"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// The pins are the datapath's state (conntrack, services, endpoints): only root may reach
// them, even when the directory existed with a looser mode before the agent started.
func TestPinRootIsPrivate(t *testing.T) {
	root := loadertest.PinRoot(t)
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	loadertest.New(t, loader.Config{PinRoot: root})
	fi, err := os.Stat(root)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Fatalf("pin root %s has mode %s, want 0700", root, fi.Mode().Perm())
	}
}
