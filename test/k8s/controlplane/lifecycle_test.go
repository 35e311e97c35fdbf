package controlplane_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/test/k8s/controlplane"
)

// helperEnv makes the test binary run a control plane and wait to be killed instead of
// running tests; TestChildrenDieWithTheTestProcess uses it.
const helperEnv = "TERN_CONTROLPLANE_HELPER_DATADIR"

func TestMain(m *testing.M) {
	if dir := os.Getenv(helperEnv); dir != "" {
		os.Exit(runHelper(dir))
	}
	os.Exit(m.Run())
}

func runHelper(dataDir string) int {
	binDir, err := controlplane.BinDir()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{BinDir: binDir, DataDir: dataDir, ControllerManager: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("READY %s\n", cp.APIServerURL())
	select {} // until SIGKILLed by the parent test
}

// processesUsing returns the pids of processes whose command line mentions dir.
func processesUsing(t *testing.T, dir string) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte(dir)) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// TestChildrenDieWithTheTestProcess kills a process that started a control plane, without
// giving it a chance to clean up, and checks that etcd, kube-apiserver and
// kube-controller-manager die with it (Pdeathsig) instead of lingering on the machine.
func TestChildrenDieWithTheTestProcess(t *testing.T) {
	if _, err := controlplane.BinDir(); err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	dataDir := t.TempDir()
	t.Cleanup(func() { // only matters when the test fails
		for _, pid := range processesUsing(t, dataDir) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	helper := exec.Command(os.Args[0], "-test.run=^$")
	helper.Env = append(os.Environ(), helperEnv+"="+dataDir)
	var stderr bytes.Buffer
	helper.Stderr = &stderr
	out, err := helper.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		ready <- line
	}()
	select {
	case line := <-ready:
		if !strings.HasPrefix(line, "READY ") {
			_ = helper.Process.Kill()
			_ = helper.Wait()
			t.Fatalf("helper did not start a control plane: %q, stderr:\n%s", line, stderr.String())
		}
	case <-time.After(2 * time.Minute):
		_ = helper.Process.Kill()
		t.Fatalf("helper not ready within 2 minutes; stderr:\n%s", stderr.String())
	}
	if n := len(processesUsing(t, dataDir)); n != 3 {
		t.Fatalf("found %d processes using %s, want 3 (etcd, kube-apiserver, kube-controller-manager)", n, dataDir)
	}

	if err := helper.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = helper.Wait()
	deadline := time.Now().Add(10 * time.Second)
	for {
		left := processesUsing(t, dataDir)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("processes %v still running 10 s after their parent was killed", left)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
