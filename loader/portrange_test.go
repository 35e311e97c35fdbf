package loader

import "testing"

func TestParseLocalPortRange(t *testing.T) {
	if r, err := parseLocalPortRange("32768\t60999\n"); err != nil || r != (PortRange{Min: 32768, Max: 60999}) {
		t.Fatalf("parse the kernel's format: %v, %v", r, err)
	}
	for _, bad := range []string{"", "32768", "60999 32768", "0 100", "1 70000", "a b", "1 2 3"} {
		if r, err := parseLocalPortRange(bad); err == nil {
			t.Errorf("%q parsed as %v, want an error", bad, r)
		}
	}
}

func TestSNATSkip(t *testing.T) {
	for _, c := range []struct {
		min, count uint16
		local      PortRange
		want       PortRange // Min > Max: no window
		fails      bool
	}{
		{1024, 64512, PortRange{32768, 60999}, PortRange{32768, 60999}, false},
		{40000, 25536, PortRange{32768, 60999}, PortRange{40000, 60999}, false},
		{1024, 30000, PortRange{32768, 60999}, PortRange{1024, 1023}, false}, // 1024-31023: no overlap
		{1024, 64512, PortRange{1024, 65000}, PortRange{}, true},             // 535 ports left
		{32768, 28232, PortRange{32768, 60999}, PortRange{}, true},           // none left
	} {
		cfg := Config{SNATPortMin: c.min, SNATPortCount: c.count, LocalPortRange: c.local}
		got, err := cfg.snatSkip()
		if c.fails != (err != nil) || (!c.fails && (got.count() != c.want.count() || (c.want.count() > 0 && got != c.want))) {
			t.Errorf("SNAT %d+%d, node %s: window %v (%d ports), err %v; want %v, failing %v", c.min, c.count, c.local, got, got.count(), err, c.want, c.fails)
		}
	}
}
