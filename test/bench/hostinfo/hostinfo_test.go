package hostinfo

import "testing"

func TestParseCacheSize(t *testing.T) {
	for _, c := range []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"32768K", 32 << 20, true},
		{"2M", 2 << 20, true},
		{"512", 512, true},
		{"1G", 0, false},
		{"", 0, false},
		{"K", 0, false},
	} {
		got, ok := parseCacheSize(c.in)
		if got != c.want || ok != c.ok {
			t.Errorf("parseCacheSize(%q) = %d, %v; want %d, %v", c.in, got, ok, c.want, c.ok)
		}
	}
}

func TestThisMachine(t *testing.T) {
	if KernelRelease() == "?" {
		t.Error("no kernel release from /proc/sys/kernel/osrelease")
	}
	if size, desc := LLC(); size == 0 && desc != "cache size unknown" {
		t.Errorf("LLC() = 0, %q: a zero size must say it is unknown", desc)
	}
}
