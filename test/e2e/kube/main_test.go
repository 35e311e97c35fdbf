//go:build linux

// Package kube_test is tern's end-to-end suite against a real Kubernetes control plane: the
// lab (test/lab) runs etcd, kube-apiserver and kube-controller-manager on loopback, the ECS
// emulator, and two node namespaces with real tern-agent processes; pods are created as a
// kubelet would (Pod object, CNI ADD through libcni, status Ready) and traffic runs between
// pod namespaces through ClusterIPs.
package kube_test

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/test/k8s/controlplane"
	"github.com/tern-net/tern/test/lab"
)

// One lab serves the whole package (bringing one up costs ~10 s); every test works in a
// namespace of its own. It is built lazily by the first test that needs it, so that a
// non-root run skips cleanly, and torn down after all tests.
type suiteState struct {
	lab *lab.Lab
	err error
	bin string
	up  bool
	// buildErr is the binaries' build error (build runs once)
	buildErr error
}

func TestMain(m *testing.M) {
	s := &suiteState{}
	current = s
	code := m.Run()
	if s.lab != nil {
		if err := s.lab.Down(); err != nil {
			os.Stderr.WriteString("lab down: " + err.Error() + "\n")
			code = 1
		}
	}
	if s.bin != "" {
		os.RemoveAll(s.bin)
	}
	os.Exit(code)
}

// current is set once by TestMain before any test runs and only read afterwards.
var current *suiteState

func getLab(t testing.TB) *lab.Lab {
	t.Helper()
	testutil.RequirePrivileged(t)
	if _, err := controlplane.BinDir(); err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	s := current
	if !s.up {
		s.up = true
		s.err = s.start()
	}
	if s.err != nil {
		t.Fatalf("lab up: %v", s.err)
	}
	return s.lab
}

func (s *suiteState) start() error {
	if err := s.build(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var err error
	s.lab, err = lab.Up(ctx, lab.Options{Nodes: 2, Kubernetes: true, BinDir: s.bin,
		ENIConf: lab.ENIConf{MinPoolSize: 4, MaxPoolSize: 12}})
	return err
}

// build builds tern-agent and tern-cni once, for the shared lab and the labs of their own.
func (s *suiteState) build() error {
	if s.bin != "" {
		return s.buildErr
	}
	dir, err := os.MkdirTemp("", "tern-e2e-bin-")
	if err != nil {
		return err
	}
	s.bin = dir
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	s.buildErr = lab.BuildBinaries(ctx, dir)
	return s.buildErr
}

// binaries is the directory of the suite's tern-agent and tern-cni, for a test that brings up
// a lab of its own and does not need the shared one.
func binaries(t testing.TB) string {
	t.Helper()
	testutil.RequirePrivileged(t)
	if _, err := controlplane.BinDir(); err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	if err := current.build(); err != nil {
		t.Fatalf("build the binaries: %v", err)
	}
	return current.bin
}
