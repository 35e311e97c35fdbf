package agent

import (
	"strings"
	"testing"
	"time"
)

func TestValidateListingGrace(t *testing.T) {
	for _, c := range []struct {
		grace, poll time.Duration
		want        string // "" accepted, else part of the error
	}{
		{0, 0, ""},                // the default
		{10 * time.Second, 0, ""}, // the default, spelled out
		{2 * time.Second, 0, ""},  // above the client's 500 ms poll
		{50 * time.Millisecond, 10 * time.Millisecond, ""}, // a lab's fast poll
		{-time.Second, 0, "listingGrace -1s is negative"},
		{500 * time.Millisecond, 0, "does not exceed cloud.pollInterval 500ms"},
		{time.Second, time.Second, "does not exceed cloud.pollInterval 1s"},
		{2 * time.Hour, 0, "listingGrace 2h0m0s is longer than 1h0m0s"},
	} {
		cfg := Config{NodeName: "n1", ListingGrace: Duration(c.grace), Cloud: CloudTuning{PollInterval: Duration(c.poll)}}
		cfg.setDefaults()
		err := cfg.Validate()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("listingGrace %s, poll %s refused: %v", c.grace, c.poll, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("listingGrace %s, poll %s: %v, want an error with %q", c.grace, c.poll, err, c.want)
		}
	}
}
