// Package hostinfo describes the machine a benchmark ran on (kernel, CPU, last-level cache),
// so every report states the same facts read the same way.
package hostinfo

import (
	"fmt"
	"os"
	"strings"
)

// KernelRelease is the running kernel's release (/proc/sys/kernel/osrelease), or "?".
func KernelRelease() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}

// CPUModel is the first "model name" of /proc/cpuinfo, or "?".
func CPUModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "model name"); ok {
			return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
		}
	}
	return "?"
}

// LLC is the largest cache level of CPU 0 from sysfs: its size in bytes and a description
// such as "L3 32768K". Size is 0 and the description says so when sysfs has no cache entries
// (some VMs): a working-set claim then cannot be checked against the cache.
func LLC() (size uint64, desc string) {
	desc = "cache size unknown"
	for i := range 8 {
		b, err := os.ReadFile(fmt.Sprintf("/sys/devices/system/cpu/cpu0/cache/index%d/size", i))
		if err != nil {
			break
		}
		n, ok := parseCacheSize(strings.TrimSpace(string(b)))
		if ok && n > size {
			lvl, _ := os.ReadFile(fmt.Sprintf("/sys/devices/system/cpu/cpu0/cache/index%d/level", i))
			size, desc = n, fmt.Sprintf("L%s %s", strings.TrimSpace(string(lvl)), strings.TrimSpace(string(b)))
		}
	}
	return size, desc
}

// parseCacheSize reads sysfs' cache size spelling: a number with an optional K or M suffix.
func parseCacheSize(s string) (uint64, bool) {
	var n uint64
	var unit string
	if k, _ := fmt.Sscanf(s, "%d%s", &n, &unit); k < 1 {
		return 0, false
	}
	switch unit {
	case "":
	case "K":
		n <<= 10
	case "M":
		n <<= 20
	default:
		return 0, false
	}
	return n, true
}
