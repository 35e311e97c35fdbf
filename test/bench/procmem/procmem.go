// Package procmem reads a live process's memory from /proc, for the benchmarks that report
// the agent's and kube-proxy's resident set.
package procmem

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Read returns VmRSS and VmHWM (the peak resident set) of pid, in bytes. A process that is
// gone, or a status without VmRSS, is an error.
func Read(pid int) (rss, peak uint64, err error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, fmt.Errorf("read memory of pid %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 || f[2] != "kB" {
			continue
		}
		kb, perr := strconv.ParseUint(f[1], 10, 64)
		if perr != nil {
			continue
		}
		switch f[0] {
		case "VmRSS:":
			rss = kb << 10
		case "VmHWM:":
			peak = kb << 10
		}
	}
	if rss == 0 {
		return 0, 0, fmt.Errorf("no VmRSS for pid %d (process gone?)", pid)
	}
	return rss, peak, nil
}

// Kinds splits a process's resident set (bytes) by what backs it: anonymous memory (the Go
// heap, stacks, runtime metadata), file pages (the binary's text and data, shared
// libraries) and shared memory (RssAnon, RssFile and RssShmem of /proc/PID/status).
type Kinds struct{ Anon, File, Shmem uint64 }

// ReadKinds returns pid's resident set by kind.
func ReadKinds(pid int) (Kinds, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Kinds{}, fmt.Errorf("read memory of pid %d: %w", pid, err)
	}
	var k Kinds
	found := 0
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 || f[2] != "kB" {
			continue
		}
		kb, perr := strconv.ParseUint(f[1], 10, 64)
		if perr != nil {
			continue
		}
		switch f[0] {
		case "RssAnon:":
			k.Anon, found = kb<<10, found+1
		case "RssFile:":
			k.File, found = kb<<10, found+1
		case "RssShmem:":
			k.Shmem, found = kb<<10, found+1
		}
	}
	if found != 3 {
		return Kinds{}, fmt.Errorf("pid %d: /proc status lacks RssAnon, RssFile or RssShmem (process gone?)", pid)
	}
	return k, nil
}
