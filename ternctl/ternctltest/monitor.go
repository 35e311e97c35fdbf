// Package ternctltest helps tests drive ternctl.
package ternctltest

import (
	"bufio"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/tern-net/tern/ternctl"
)

// StartMonitor runs a `ternctl monitor` invocation in the background and returns once it
// reads its ring buffer (it says so on stderr, ternctl.MonitorReading): events caused after
// that are the monitor's to show. run calls ternctl.Main with the writers it is given, in
// whatever namespace the test needs, and returns the exit code. lines carries stdout line by
// line and is closed when the monitor ends; exit then receives its exit code. A monitor that
// ends before it reads, or does not read within 30 s, fails the test.
func StartMonitor(t testing.TB, run func(stdout, stderr io.Writer) int) (lines <-chan string, exit <-chan int) {
	t.Helper()
	outR, outW := io.Pipe()
	errR, errW := io.Pipe()
	done := make(chan int, 1)
	go func() {
		code := run(outW, errW)
		outW.Close()
		errW.Close()
		done <- code
	}()
	reading := make(chan string, 1)
	go func() {
		// Drain stderr to the end, so the monitor never blocks writing to it.
		sc := bufio.NewScanner(errR)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), ternctl.MonitorReading) {
				select {
				case reading <- sc.Text():
				default:
				}
			}
		}
		close(reading)
	}()
	select {
	case line, ok := <-reading:
		if !ok {
			t.Fatalf("ternctl monitor ended before it read its ring buffer (exit %d)", <-done)
		}
		t.Log(line)
	case <-time.After(30 * time.Second):
		t.Fatal("ternctl monitor did not start reading within 30s")
	}
	out := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(outR)
		for sc.Scan() {
			out <- sc.Text()
		}
		close(out)
	}()
	return out, done
}
