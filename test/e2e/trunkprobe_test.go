//go:build linux

package e2e

import (
	"errors"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/datapath"
	"github.com/tern-net/tern/internal/testutil"
)

// TestTrunkProbeFollowsKernel: the trunk programs load on every supported kernel, and the tcx
// probe the agent runs before it turns the member kind on answers as the kernel's BTF says: nil
// with tcx (Linux ≥ 6.6), an error wrapping ErrNotSupported without it (6.1, where the agent
// then attaches the trunk programs with clsact: TestTrunkVLANProgramsRunBeforeNetdev).
func TestTrunkProbeFollowsKernel(t *testing.T) {
	testutil.RequirePrivileged(t)
	tr, err := datapath.LoadTrunk("")
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	err = tr.ProbeTCX()
	if kernelHasTCX(t) {
		if err != nil {
			t.Fatalf("kernel has tcx, probe says %v", err)
		}
		return
	}
	if !errors.Is(err, ebpf.ErrNotSupported) {
		t.Fatalf("kernel lacks tcx, probe says %v; want an error wrapping ErrNotSupported", err)
	}
	t.Logf("probe on a kernel without tcx: %v", err)
}
