package lab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"go.uber.org/zap"

	"github.com/tern-net/tern/loader"
)

// A lab whose process dies before Down (kill -9, a test binary's timeout, a crashed daemon)
// leaves its bpffs pins behind: its agents die with it (Pdeathsig), its namespaces are
// anonymous and go with their last process, but /sys/fs/bpf/tern-lab-* directories and the
// socket-LB cgroups stay until someone removes them, holding maps and program links. Every
// Up therefore sweeps the pins of dead labs first.
//
// Several labs run at once on one machine (parallel test binaries, the demo daemon, other
// checkouts), so the sweep must never touch a live lab's pins. Each lab records its owner
// in its pin root, as a directory (bpffs holds only pins and directories, and refuses names
// with a dot): owner-<pid>-<start>, the lab process's PID and its start time in clock ticks
// since boot (/proc/<pid>/stat field 22). A pin root is stale only when no recorded owner
// is running: the PID is gone or now belongs to a process that started at another time
// (PID reuse). A pin root without an owner record is left alone: it is a lab between
// creating its pin root and recording itself, or one built by code older than this sweep,
// which cannot be told from a live one. The one exception is the tern-lab daemon's
// tern-lab-<pid>: without a record it is stale when no process has that PID.
//
// A SocketLB lab also records its cgroup (cgroup-<name>, under the cgroup v2 root), which
// the sweep removes with its node cgroups.
const (
	ownerPrefix  = "owner-"
	cgroupPrefix = "cgroup-"
	labPinPrefix = "tern-lab-"
)

// procStart is the start time of process pid in clock ticks since boot; ok is false when
// there is no such process.
func procStart(pid int) (start uint64, ok bool, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH) { // gone, or exiting as we read
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("read /proc/%d/stat: %w", pid, err)
	}
	// The command name (field 2) is in parentheses and may hold spaces and parentheses:
	// the fields after it start after the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, false, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state): field 22 (starttime) is f[19].
	if len(f) < 20 {
		return 0, false, fmt.Errorf("/proc/%d/stat: %d fields after the command name, want at least 20", pid, len(f))
	}
	start, err = strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, false, fmt.Errorf("/proc/%d/stat: starttime %q: %w", pid, f[19], err)
	}
	return start, true, nil
}

// ownerRecord is the name of the directory recording this process as a pin root's owner.
func ownerRecord() (string, error) {
	pid := os.Getpid()
	start, ok, err := procStart(pid)
	if err != nil {
		return "", fmt.Errorf("read this process's start time: %w", err)
	}
	if !ok {
		return "", fmt.Errorf("no /proc entry for this process (%d): is /proc mounted?", pid)
	}
	return fmt.Sprintf("%s%d-%d", ownerPrefix, pid, start), nil
}

// recordOwner creates pinRoot (0700, as the loader would) with this process's owner record,
// and the cgroup record when cgroup is set.
func recordOwner(pinRoot, cgroup string) error {
	rec, err := ownerRecord()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(pinRoot, rec), 0o700); err != nil {
		return fmt.Errorf("record the lab's owner in %s: %w", pinRoot, err)
	}
	if cgroup != "" {
		if err := os.Mkdir(filepath.Join(pinRoot, cgroupPrefix+filepath.Base(cgroup)), 0o700); err != nil {
			return fmt.Errorf("record the lab's cgroup in %s: %w", pinRoot, err)
		}
	}
	return nil
}

// labOwner is one owner record: the lab process's PID and start time.
type labOwner struct {
	pid   int
	start uint64
}

// readRecords reads a pin root's records: its owners and its cgroup's name.
func readRecords(pinRoot string) (owners []labOwner, cgroups []string, err error) {
	ents, err := os.ReadDir(pinRoot)
	if err != nil {
		return nil, nil, err
	}
	for _, e := range ents {
		name := e.Name()
		switch {
		case strings.HasPrefix(name, ownerPrefix):
			pidS, startS, ok := strings.Cut(strings.TrimPrefix(name, ownerPrefix), "-")
			pid, err1 := strconv.Atoi(pidS)
			start, err2 := strconv.ParseUint(startS, 10, 64)
			if !ok || err1 != nil || err2 != nil || pid <= 0 {
				// A record this code did not write: treat the lab as live rather than guess.
				return nil, nil, fmt.Errorf("%s: unreadable owner record %q", pinRoot, name)
			}
			owners = append(owners, labOwner{pid, start})
		case strings.HasPrefix(name, cgroupPrefix):
			cg := strings.TrimPrefix(name, cgroupPrefix)
			if strings.HasPrefix(cg, labPinPrefix) && !strings.ContainsAny(cg, "/.") {
				cgroups = append(cgroups, cg)
			}
		}
	}
	return owners, cgroups, nil
}

// SweepReport is what a sweep removed and what it kept.
type SweepReport struct {
	Removed []string // pin roots (and cgroups) of dead labs, removed
	Live    []string // pin roots with a running owner
	Unknown []string // pin roots without an owner record, left alone
}

// SweepStalePins removes the pin roots bpffs/tern-lab-* of labs whose process is gone, and
// their cgroups under cgroupRoot (empty: none). It never removes a pin root that has a
// running owner or no owner record. Errors for one directory do not stop the others.
func SweepStalePins(bpffs, cgroupRoot string) (SweepReport, error) {
	var rep SweepReport
	var errs []error
	roots, err := filepath.Glob(filepath.Join(bpffs, labPinPrefix+"*"))
	if err != nil {
		return rep, err
	}
	for _, root := range roots {
		stale, cgroups, err := staleRoot(root)
		switch {
		case err != nil:
			errs = append(errs, err)
			continue
		case stale == nil:
			rep.Unknown = append(rep.Unknown, root)
			continue
		case !*stale:
			rep.Live = append(rep.Live, root)
			continue
		}
		if err := os.RemoveAll(root); err != nil {
			errs = append(errs, fmt.Errorf("remove stale lab pins %s: %w", root, err))
			continue
		}
		rep.Removed = append(rep.Removed, root)
		if cgroupRoot == "" {
			continue
		}
		for _, cg := range cgroups {
			dir := filepath.Join(cgroupRoot, cg)
			if err := removeCgroup(dir); err != nil {
				errs = append(errs, err)
				continue
			}
			rep.Removed = append(rep.Removed, dir)
		}
	}
	return rep, errors.Join(errs...)
}

// staleRoot tells whether a pin root's owner is gone (nil: cannot tell, leave it).
func staleRoot(root string) (stale *bool, cgroups []string, err error) {
	yes, no := true, false
	owners, cgroups, err := readRecords(root)
	if errors.Is(err, os.ErrNotExist) {
		return &no, nil, nil // removed meanwhile by its own Down
	}
	if err != nil {
		return nil, nil, err
	}
	if len(owners) == 0 {
		// The daemon's pin root names its PID.
		pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(root), labPinPrefix))
		if err != nil || pid <= 0 {
			return nil, nil, nil
		}
		if _, ok, err := procStart(pid); err != nil || ok {
			return nil, nil, err
		}
		return &yes, cgroups, nil
	}
	for _, o := range owners {
		start, ok, err := procStart(o.pid)
		if err != nil {
			return nil, nil, err
		}
		if ok && start == o.start {
			return &no, nil, nil
		}
	}
	return &yes, cgroups, nil
}

// removeCgroup removes a dead lab's cgroup and its node cgroups (empty: their processes
// died with the lab).
func removeCgroup(dir string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read stale lab cgroup %s: %w", dir, err)
	}
	for _, e := range ents {
		if e.IsDir() {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
				return fmt.Errorf("remove stale lab cgroup %s: %w", filepath.Join(dir, e.Name()), err)
			}
		}
	}
	if err := os.Remove(dir); err != nil {
		return fmt.Errorf("remove stale lab cgroup %s: %w", dir, err)
	}
	return nil
}

// sweepStale runs SweepStalePins on the machine's bpffs and cgroup v2 root and logs what it
// did. A failed sweep does not stop the lab (the pins it could not remove are a dead lab's,
// not this one's); it is logged with what to remove by hand.
func (l *Lab) sweepStale() {
	cgRoot, err := loader.CgroupV2Root()
	if err != nil {
		cgRoot = "" // no cgroup v2: no lab made a cgroup either
	}
	rep, err := SweepStalePins("/sys/fs/bpf", cgRoot)
	for _, r := range rep.Removed {
		l.log.Info("removed a dead lab's leftovers", zap.String("path", r))
	}
	if err != nil {
		l.log.Warn("could not sweep every dead lab's pins; remove them by hand (rm -r) once their lab is known dead", zap.Error(err))
	}
}
