package policy_test

import (
	"syscall"
	"testing"
	"time"

	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policytest"
)

// 1,000 policies over 2,000 pods compile in well under a second.
func TestCompileScale(t *testing.T) {
	if testing.Short() {
		t.Skip("scale test")
	}
	st := policytest.BigState()
	// CPU time, not wall time: this machine's two cores are shared, and wall time measured
	// the neighbours (2.4 s wall for 0.5 s of CPU under a load average of 30).
	cpu0 := cpuTime(t)
	start := time.Now()
	d, err := policy.Compile(st)
	if err != nil {
		t.Fatal(err)
	}
	wall, cpu := time.Since(start), cpuTime(t)-cpu0
	t.Logf("compiled %d policies over %d pods in %v CPU (%v wall): %d identities, %d rules, %d CIDRs, %d isolated",
		len(st.Policies), len(st.Pods), cpu, wall, len(d.Shapes), len(d.Rules), len(d.CIDRs), len(d.Isolation))
	if cpu > time.Second {
		t.Fatalf("compile took %v of CPU, want < 1s", cpu)
	}
}

// cpuTime is the process's user+system CPU time (the compile is single-threaded; the rest is
// the garbage collector working for it).
func cpuTime(t *testing.T) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func BenchmarkCompile1000Policies2000Pods(b *testing.B) {
	st := policytest.BigState()
	b.ResetTimer()
	for b.Loop() {
		if _, err := policy.Compile(st); err != nil {
			b.Fatal(err)
		}
	}
}
