package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

func TestSocketLBConfigValidation(t *testing.T) {
	for _, c := range []struct {
		sl   SocketLBConfig
		want string
	}{
		{SocketLBConfig{Enabled: true}, ""},
		{SocketLBConfig{Enabled: true, Cgroup: "/sys/fs/cgroup"}, ""},
		{SocketLBConfig{Enabled: true, Cgroup: "sys/fs/cgroup"}, "must be an absolute path"},
		{SocketLBConfig{Cgroup: "/sys/fs/cgroup"}, "socketLB.enabled is false"},
	} {
		err := Config{NodeName: "n1", SocketLB: c.sl}.Validate()
		if c.want == "" && err != nil || c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)) {
			t.Errorf("%+v: got %v, want %q", c.sl, err, c.want)
		}
	}
}

// TestStartSockLB: the agent attaches the hooks to its configured cgroup, leaves them
// attached when it stops, hands the reconciler maps that report backend removals, and a
// later agent with socketLB off removes them.
func TestStartSockLB(t *testing.T) {
	dp := loadertest.New(t, loader.Config{})
	root, err := loader.CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	var b [6]byte
	rand.Read(b[:])
	parent := filepath.Join(root, "tern-test-"+hex.EncodeToString(b[:]))
	cg := filepath.Join(parent, "agent")
	for _, d := range []string{parent, cg} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, d := range []string{cg, parent} {
			if err := os.Remove(d); err != nil {
				t.Errorf("remove test cgroup: %v", err)
			}
		}
	})
	fi, err := os.Stat(cg)
	if err != nil {
		t.Fatal(err)
	}
	id := fi.Sys().(*syscall.Stat_t).Ino

	a, err := New(Config{NodeName: "n1", SocketLB: SocketLBConfig{Enabled: true, Cgroup: cg}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	stop, err := a.startSockLB(context.Background(), dp)
	if err != nil {
		t.Fatal(err)
	}
	if a.SockLB() == nil {
		t.Fatal("socket LB not recorded on the agent")
	}
	if _, ok := a.lbMaps(dp).(*memberWatch); !ok {
		t.Fatal("with socket LB on, the reconciler's maps must report membership deletes")
	}
	stop()
	if _, ok := a.lbMaps(dp).(*memberWatch); ok {
		t.Fatal("after stop the reconciler still gets the watching maps")
	}
	hooks, got := loader.SockAttached(dp.Config().PinRoot)
	if len(hooks) != 8 || got != id {
		t.Fatalf("after the agent stopped: hooks %v on cgroup %d, want 8 on %d (they outlive the agent)", hooks, got, id)
	}

	off, err := New(Config{NodeName: "n1"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	stop, err = off.startSockLB(context.Background(), dp)
	if err != nil {
		t.Fatal(err)
	}
	stop()
	if hooks, _ := loader.SockAttached(dp.Config().PinRoot); len(hooks) != 0 {
		t.Fatalf("socketLB off left hooks %v attached", hooks)
	}

	bad, err := New(Config{NodeName: "n1", SocketLB: SocketLBConfig{Enabled: true, Cgroup: t.TempDir()}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bad.startSockLB(context.Background(), dp); err == nil || !strings.Contains(err.Error(), "not a cgroup v2 directory") {
		t.Fatalf("a non-cgroup directory: %v", err)
	}
}

func TestMemberWatchKicksOnce(t *testing.T) {
	s := &sockLB{kick: make(chan struct{}, 1)}
	for range 3 {
		s.backendRemoved()
	}
	if len(s.kick) != 1 {
		t.Fatalf("three removals queued %d passes, want one", len(s.kick))
	}
}
