//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/tern-net/tern/internal/sockclient"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/test/lab"
)

// binDir holds tern-agent and tern-cni, built once for the package.
var binDir string

func TestMain(m *testing.M) {
	sockclient.MaybeRun()
	if socket := os.Getenv(floodEnv); socket != "" {
		count, _ := strconv.Atoi(os.Getenv(floodCountEnv))
		floodHelper(socket, count)
		return
	}
	dir, err := os.MkdirTemp("", "tern-lab-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	err = lab.BuildBinaries(ctx, dir)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// up starts a lab for the test and tears it down when the test ends. On failure the agents'
// logs are copied into the test log before the lab directory goes.
func up(t *testing.T, o lab.Options) *lab.Lab {
	t.Helper()
	testutil.RequirePrivileged(t)
	o.BinDir = binDir
	if o.Logger == nil {
		o.Logger = zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)).Named("lab")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, o)
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range l.Nodes() {
				if b, err := os.ReadFile(n.AgentLog()); err == nil {
					tail := b
					if len(tail) > 20000 {
						tail = tail[len(tail)-20000:]
					}
					t.Logf("=== agent log of %s (tail) ===\n%s", n.Name, tail)
				}
			}
		}
		if err := l.Down(); err != nil {
			t.Errorf("lab down: %v", err)
		}
	})
	// Registered after Down's clean-up, so it runs before it, while the logs and agents are
	// still there.
	t.Cleanup(func() { checkNoSecrets(t, l) })
	return l
}
