package loader_test

import "golang.org/x/sys/unix"

// monotonicNS reads CLOCK_MONOTONIC, the clock bpf_ktime_get_ns uses.
func monotonicNS() (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, err
	}
	return uint64(ts.Nano()), nil
}
