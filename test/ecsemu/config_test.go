package ecsemu

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoadLabConfig(t *testing.T) {
	c, err := LoadConfig("testdata/lab.json")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Instances) != 2 || c.Instances[1].NetNSPath != "/run/netns/tern-node2" ||
		time.Duration(c.Delays.Attach) != 300*time.Millisecond || time.Duration(c.Latency) != 2*time.Millisecond {
		t.Fatalf("lab config read as %+v", c)
	}
}

func TestConfigValidation(t *testing.T) {
	cases := []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"vSwitch outside VPC", func(c *Config) { c.VSwitches[0].CIDR = "10.9.0.0/24" }, "outside vpc"},
		{"unknown type", func(c *Config) { c.Instances[0].Type = "ecs.nope" }, "unknown instance type"},
		{"reserved primary IP", func(c *Config) { c.Instances[0].PrimaryIP = "192.168.1.253" }, "not a usable address"},
		{"no keys", func(c *Config) { c.AccessKeys = nil }, "no accessKeys"},
		{"bad delay", nil, "parse duration"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.mod == nil {
				p := filepath.Join(t.TempDir(), "c.json")
				if err := os.WriteFile(p, []byte(`{"delays":{"attach":"soon"}}`), 0o600); err != nil {
					t.Fatal(err)
				}
				_, err := LoadConfig(p)
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("error %v, want one containing %q", err, tc.want)
				}
				return
			}
			c := TestConfig()
			tc.mod(c)
			if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestReservedAddresses(t *testing.T) {
	c := TestConfig()
	e, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	v, _ := e.Snapshot().VSwitch("vsw-test-a")
	if v.Gateway != "192.168.1.253" || v.Available != 251 {
		t.Fatalf("vsw-test-a gateway %s available %d, want 192.168.1.253 and 251", v.Gateway, v.Available)
	}
}

func TestTimingRealisticByDefaultFastWhenAsked(t *testing.T) {
	c := TestConfig()
	c.Timing = ""
	c.Delays.Attach = Duration(7 * time.Millisecond) // a field set by hand is kept
	e, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	lat, d, lag := RealisticTiming()
	want := d
	want.Attach = Duration(7 * time.Millisecond)
	if e.delays != want || e.lag != lag || Duration(e.latency.Load()) != lat {
		t.Fatalf("realistic: delays %+v lag %+v latency %v; want %+v %+v %v", e.delays, e.lag, Duration(e.latency.Load()), want, lag, lat)
	}
	if d.Attach < Duration(time.Second) || d.Route < Duration(time.Second) {
		t.Fatalf("realistic attach %v and route %v should take seconds", d.Attach, d.Route)
	}
	fast, err := New(TestConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer fast.Close()
	if fast.delays != (TransitionDelays{}) || fast.lag != (ListingLag{}) || fast.latency.Load() != 0 {
		t.Fatalf("fast: delays %+v lag %+v latency %d; want all zero", fast.delays, fast.lag, fast.latency.Load())
	}
	c = TestConfig()
	c.Timing = "slow"
	if err := c.Validate(); err == nil {
		t.Fatal("timing \"slow\" accepted")
	}
}
