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

func TestReadKindsAddsUpToRSS(t *testing.T) {
	k, err := ReadKinds(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	rss, _, err := Read(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// The three kinds are the resident set; both reads round to pages, and the process
	// may touch a few pages between them.
	sum := k.Anon + k.File + k.Shmem
	if k.Anon == 0 || k.File == 0 || sum+1<<20 < rss || sum > rss+1<<20 {
		t.Fatalf("anon %d + file %d + shmem %d = %d, VmRSS %d", k.Anon, k.File, k.Shmem, sum, rss)
	}
	if _, err := ReadKinds(1 << 22); err == nil {
		t.Fatal("a pid above PID_MAX_LIMIT read without error")
	}
}
