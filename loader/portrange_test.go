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

func TestKeepOutOf(t *testing.T) {
	linux := PortRange{Min: 32768, Max: 60999}
	var c Config
	if !c.KeepOutOf(linux) || c.LocalPortRange != linux {
		t.Fatalf("Linux's default range with the default SNAT range: kept %v, want the window set", c.LocalPortRange)
	}
	wide := PortRange{Min: 1024, Max: 65535}
	if c.KeepOutOf(wide) || c.LocalPortRange.count() != 0 || c.LocalPortRange == (PortRange{}) {
		t.Fatalf("a node range of %s: window %v; want KeepOutOf false and an empty window (not the zero value, which means Linux's default)", wide, c.LocalPortRange)
	}
	if _, err := c.snatSkip(); err != nil {
		t.Fatalf("the empty window KeepOutOf set is refused: %v", err)
	}
	// masquerade.portMin 61000 reaches outside even a wide-from-1024 range ending at 60999.
	c = Config{SNATPortMin: 61000}
	if !c.KeepOutOf(PortRange{Min: 1024, Max: 60999}) {
		t.Fatal("SNAT 61000-65535 beside a node range of 1024-60999: refused, want kept (no overlap)")
	}
}
