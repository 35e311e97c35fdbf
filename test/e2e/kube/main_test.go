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
	dir, err := os.MkdirTemp("", "tern-e2e-bin-")
	if err != nil {
		return err
	}
	s.bin = dir
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := lab.BuildBinaries(ctx, dir); err != nil {
		return err
	}
	s.lab, err = lab.Up(ctx, lab.Options{Nodes: 2, Kubernetes: true, BinDir: dir,
		ENIConf: lab.ENIConf{MinPoolSize: 4, MaxPoolSize: 12}})
	return err
}
