package kube

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"unicode/utf8"

	"k8s.io/client-go/tools/record"

	"github.com/tern-net/tern/ipam"
)

func TestBoundEventMessage(t *testing.T) {
	exact := strings.Repeat("a", MaxEventMessage)
	if got := boundEventMessage(exact); got != exact {
		t.Errorf("a message of exactly %d bytes was changed", MaxEventMessage)
	}
	if got := boundEventMessage("short"); got != "short" {
		t.Errorf("short message became %q", got)
	}
	for name, long := range map[string]string{
		"ascii":     strings.Repeat("x", 100*1024),
		"one over":  strings.Repeat("y", MaxEventMessage+1),
		"multibyte": strings.Repeat("é漢", 50_000), // 5 bytes a pair: the cut lands inside a character
	} {
		got := boundEventMessage(long)
		if len(got) > MaxEventMessage {
			t.Errorf("%s: %d bytes, more than %d", name, len(got), MaxEventMessage)
		}
		if !utf8.ValidString(got) {
			t.Errorf("%s: cut inside a character", name)
		}
		if want := fmt.Sprintf("[cut: %d bytes in all;", len(long)); !strings.Contains(got, want) {
			t.Errorf("%s: %q does not say it was cut (%q)", name, got[len(got)-100:], want)
		}
		if prefix := strings.SplitN(got, " … [cut:", 2)[0]; !strings.HasPrefix(long, prefix) || len(prefix) < MaxEventMessage-100 {
			t.Errorf("%s: kept %d bytes that are not the message's start", name, len(prefix))
		}
	}
}

// TestAllocationFailureEventIsBounded: the Warning Event the component records for a failed
// allocation carries at most MaxEventMessage bytes of message, however long the error.
func TestAllocationFailureEventIsBounded(t *testing.T) {
	rec := record.NewFakeRecorder(1)
	c := &nodeReport{recorder: rec}
	long := errors.New("allocate: " + strings.Repeat("z", 100*1024))
	c.allocated(ipam.PodKey{Namespace: "default", Name: "web-0", ContainerID: "c1"}, long)
	ev := <-rec.Events
	// FakeRecorder writes "<type> <reason> <message>".
	msg := strings.TrimPrefix(ev, "Warning TernIPAllocationFailed ")
	if msg == ev {
		t.Fatalf("event %q is not a TernIPAllocationFailed Warning", ev[:min(len(ev), 200)])
	}
	if len(msg) > MaxEventMessage || !strings.Contains(msg, "[cut:") || !strings.HasPrefix(msg, "allocate: zzz") {
		t.Errorf("event message of %d bytes: %q…", len(msg), msg[:min(len(msg), 200)])
	}
}
