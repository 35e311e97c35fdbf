//go:build linux

package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/test/k8s/controlplane"
)

// TestDemo runs what `make demo` and `make demo-down` run, with this tree's binaries: up a
// 2-node lab, the whole walk-through (which fails on any request that does not succeed as
// described: the ClusterIP rounds, the host-network process through the socket hooks, the
// NodePort on each node from the external client with the source its backend must see),
// then down, after which no process, pin, cgroup or file of the lab is left.
func TestDemo(t *testing.T) {
	testutil.RequirePrivileged(t)
	k8sDir, err := controlplane.BinDir()
	if err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	bin := t.TempDir()
	build := exec.CommandContext(ctx, "go", "build", "-o", bin+"/", "github.com/tern-net/tern/cmd/tern-lab",
		"github.com/tern-net/tern/cmd/tern-agent", "github.com/tern-net/tern/cmd/tern-cni")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	dir := filepath.Join(t.TempDir(), "lab")
	labCmd := func(args ...string) (string, error) {
		args = append(args[:1:1], append([]string{"-dir", dir}, args[1:]...)...)
		out, err := exec.CommandContext(ctx, filepath.Join(bin, "tern-lab"), args...).CombinedOutput()
		return string(out), err
	}
	if out, err := labCmd("up", "-nodes", "2", "-bin-dir", bin, "-k8s-bin-dir", k8sDir); err != nil {
		t.Fatalf("tern-lab up: %v\n%s", err, out)
	}
	st, err := readState(dir)
	if err != nil {
		t.Fatal(err)
	}
	downed := false
	t.Cleanup(func() {
		if !downed {
			if out, err := labCmd("down"); err != nil {
				t.Errorf("tern-lab down: %v\n%s", err, out)
			}
		}
	})
	if st.Cgroup == "" {
		t.Fatalf("the daemon recorded no socket-LB cgroup in its state: %+v", st)
	}

	out, err := labCmd("demo", "-requests", "8")
	if err != nil {
		t.Fatalf("tern-lab demo: %v\n%s", err, out)
	}
	t.Logf("tern-lab demo:\n%s", out)
	// The demo checks every answer itself; these check that the steps ran at all.
	for _, want := range []string{"A host-network process on node-1 using the ClusterIP",
		"A NodePort Service, reached from a client outside the VPC", "hello from api-0", "hello from api-1",
		"ternctl node-1 bpf ct list", "ternctl node-1 bpf lb list"} {
		if !strings.Contains(out, want) {
			t.Errorf("the demo's output lacks %q", want)
		}
	}

	out, err = labCmd("down")
	downed = true
	if err != nil {
		t.Fatalf("tern-lab down: %v\n%s", err, out)
	}
	for _, p := range []string{dir, st.PinRoot, st.Cgroup} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s is left after down (stat: %v)", p, err)
		}
	}
	if alive(st.PID) {
		t.Errorf("the lab daemon (pid %d) still runs after down", st.PID)
	}
	if pids := processesUsing(dir); len(pids) > 0 {
		t.Errorf("processes of the lab left after down: %v", pids)
	}
}
