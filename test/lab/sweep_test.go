//go:build linux

package lab

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
)

// The sweep removes the pins (and cgroups) of labs whose process is gone and keeps every
// other pin root: a live owner's, one whose owner record is missing, one with any live
// owner. It runs on a private bpffs directory and a private cgroup, so the labs other tests
// run on this machine meanwhile are not part of it.
func TestSweepRemovesOnlyDeadLabsPins(t *testing.T) {
	testutil.RequirePrivileged(t)
	bpffs := filepath.Join("/sys/fs/bpf", fmt.Sprintf("tern-sweeptest-%d", os.Getpid()))
	if err := os.Mkdir(bpffs, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(bpffs) })
	cgRoot, err := loader.CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	cgParent := filepath.Join(cgRoot, fmt.Sprintf("tern-sweeptest-%d", os.Getpid()))
	if err := os.Mkdir(cgParent, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = removeCgroup(filepath.Join(cgParent, "tern-lab-dead"))
		_ = os.Remove(cgParent)
	})

	// A dead lab's PID: one no process can have. PIDs stay below pid_max, which the kernel
	// caps at PID_MAX_LIMIT (2^22 on 64-bit), so 2^22 is never running and cannot be reused
	// while the test runs (a PID of an exited process could be, and then the test would have
	// to skip). Its start time is any value: the PID alone says the owner is gone.
	const deadPID, deadStart = 1 << 22, uint64(12345)
	if b, err := os.ReadFile("/proc/sys/kernel/pid_max"); err != nil {
		t.Fatal(err)
	} else if pidMax, err := strconv.Atoi(strings.TrimSpace(string(b))); err != nil || pidMax > deadPID {
		t.Fatalf("pid_max %q (%v) is above %d: the kernel's limit changed; pick a PID above it", b, err, deadPID)
	}
	if _, ok, err := procStart(deadPID); err != nil || ok {
		t.Fatalf("PID %d: running=%v, %v; want no such process", deadPID, ok, err)
	}
	self := os.Getpid()
	selfStart, _, err := procStart(self)
	if err != nil {
		t.Fatal(err)
	}
	owner := func(pid int, start uint64) string { return fmt.Sprintf("owner-%d-%d", pid, start) }

	// Each lab: its pin root's entries (directories) and whether the sweep must remove it.
	labs := []struct {
		name    string
		records []string
		stale   bool
	}{
		{"tern-lab-dead", []string{owner(deadPID, deadStart), "cgroup-tern-lab-dead"}, true},
		{"tern-lab-live", []string{owner(self, selfStart)}, false},
		{"tern-lab-reused", []string{owner(self, selfStart+1)}, true}, // this PID, another process
		{"tern-lab-twoowners", []string{owner(deadPID, deadStart), owner(self, selfStart)}, false},
		{"tern-lab-norecord", nil, false},
		{fmt.Sprintf("tern-lab-%d", deadPID), nil, true}, // a daemon's pin root, daemon gone
		{fmt.Sprintf("tern-lab-%d", self), nil, false},   // a daemon's pin root, PID running
	}
	for _, l := range labs {
		root := filepath.Join(bpffs, l.name)
		for _, r := range append([]string{"node-1"}, l.records...) {
			if err := os.MkdirAll(filepath.Join(root, r), 0o700); err != nil {
				t.Fatal(err)
			}
		}
		// A real pin, as an agent leaves them.
		m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Pin(filepath.Join(root, "node-1", "tern_test")); err != nil {
			t.Fatal(err)
		}
		m.Close()
	}
	deadCg := filepath.Join(cgParent, "tern-lab-dead")
	if err := os.MkdirAll(filepath.Join(deadCg, "node-1"), 0o755); err != nil {
		t.Fatal(err)
	}

	rep, err := SweepStalePins(bpffs, cgParent)
	if err != nil {
		t.Fatalf("sweep: %v", err)
	}
	t.Logf("removed %v; live %v; unknown %v", rep.Removed, rep.Live, rep.Unknown)
	for _, l := range labs {
		root := filepath.Join(bpffs, l.name)
		_, err := os.Stat(root)
		gone := os.IsNotExist(err)
		if gone != l.stale {
			t.Errorf("%s: removed=%v, want %v", l.name, gone, l.stale)
		}
		if gone != slices.Contains(rep.Removed, root) {
			t.Errorf("%s: removed=%v but the report says %v", l.name, gone, rep.Removed)
		}
	}
	if _, err := os.Stat(deadCg); !os.IsNotExist(err) {
		t.Errorf("the dead lab's cgroup %s is still there (%v)", deadCg, err)
	}
	if !slices.Contains(rep.Removed, deadCg) {
		t.Errorf("the report does not list the dead lab's cgroup: %v", rep.Removed)
	}

	// A second sweep finds nothing more to do.
	rep, err = SweepStalePins(bpffs, cgParent)
	if err != nil || len(rep.Removed) != 0 {
		t.Fatalf("second sweep removed %v (err %v), want nothing", rep.Removed, err)
	}
}

// recordOwner writes a record the sweep reads as this live process.
func TestOwnerRecordIsLive(t *testing.T) {
	testutil.RequirePrivileged(t)
	root := filepath.Join("/sys/fs/bpf", fmt.Sprintf("tern-sweeptest-own-%d", os.Getpid()))
	t.Cleanup(func() { _ = os.RemoveAll(root) })
	if err := recordOwner(filepath.Join(root, "tern-lab-x"), "/sys/fs/cgroup/tern-lab-y"); err != nil {
		t.Fatal(err)
	}
	stale, _, err := staleRoot(filepath.Join(root, "tern-lab-x"))
	if err != nil || stale == nil || *stale {
		t.Fatalf("own pin root: stale=%v err=%v, want live", stale, err)
	}
	_, cgroups, err := readRecords(filepath.Join(root, "tern-lab-x"))
	if err != nil || !slices.Equal(cgroups, []string{"tern-lab-y"}) {
		t.Fatalf("cgroup record: %v (err %v), want [tern-lab-y]", cgroups, err)
	}
	fi, err := os.Stat(filepath.Join(root, "tern-lab-x"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Fatalf("pin root mode %v, want 0700", fi.Mode().Perm())
	}
}
