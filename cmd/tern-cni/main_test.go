package main

import (
	"strings"
	"testing"

	"github.com/tern-net/tern/agent/api"
)

// Found by FuzzParseConf: "timeout":"-1s" (or "0s") was accepted and made every call to the
// agent fail at once; "socket":"" dialled an empty path.
func TestParseConfRefusesUnusableValues(t *testing.T) {
	for _, doc := range []string{`{"timeout":"-1s"}`, `{"timeout":"0s"}`, `{"eniLinkTimeout":"-5m"}`} {
		_, err := parseConf([]byte(doc))
		if err == nil || !strings.Contains(err.Error(), "not a positive duration") {
			t.Errorf("%s: err = %v, want a refusal naming the duration", doc, err)
		}
	}
	c, err := parseConf([]byte(`{"socket":""}`))
	if err != nil || c.Socket != api.DefaultSocketPath {
		t.Fatalf("empty socket: %v %q, want the default %s", err, c.Socket, api.DefaultSocketPath)
	}
}
