package procmem

import (
	"os"
	"testing"
)

func TestReadsThisProcess(t *testing.T) {
	rss, peak, err := Read(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if rss == 0 || peak < rss {
		t.Fatalf("rss %d, peak %d: want a resident set and a peak at least as large", rss, peak)
	}
	if _, _, err := Read(1 << 22); err == nil {
		t.Fatal("a pid above PID_MAX_LIMIT read without error")
	}
}
