//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/lab"
)

// labSecrets are the credentials every lab agent is given (eni_conf access_key and
// access_secret): neither may appear in a log or in /metrics.
var labSecrets = []string{ecsemu.TestAccessKeyID, ecsemu.TestAccessKeySecret}

// checkNoSecrets greps every log file of the lab (the agents', the control plane's) and every
// running agent's /metrics for the credentials, and returns what it looked at. up runs it
// when every lab test ends, before the lab goes down.
func checkNoSecrets(t *testing.T, l *lab.Lab) (logs, scrapes int) {
	t.Helper()
	look := func(what, text string) {
		for _, s := range labSecrets {
			if i := strings.Index(text, s); i >= 0 {
				from, to := max(0, i-120), min(len(text), i+len(s)+40)
				t.Errorf("%s holds the credential %q: …%s…", what, s, text[from:to])
			}
		}
	}
	filepath.WalkDir(l.Dir(), func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(d.Name(), ".log") {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			t.Errorf("read log %s: %v", path, err)
			return nil
		}
		logs++
		look("log "+path, string(b))
		return nil
	})
	for _, n := range l.Nodes() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		m, err := n.Client().Metrics(ctx)
		cancel()
		if err != nil {
			continue // the test stopped this agent
		}
		scrapes++
		look("/metrics of "+n.Name, m)
	}
	return logs, scrapes
}

// TestCredentialsNeverInLogsOrMetrics runs agents through the paths that log cloud errors
// (refused signatures and unknown keys among throttling and internal errors, at debug
// level) and checks that neither the access key ID nor the secret reached a log or
// /metrics. Every other lab test gets the same check when it ends (up).
func TestCredentialsNeverInLogsOrMetrics(t *testing.T) {
	l := up(t, lab.Options{Nodes: 1, Seed: 11, AllocateWait: 200 * time.Millisecond,
		Faults:  []ecsemu.Fault{{Code: ecsemu.CodeThrottling, Rate: 0.1}, {Code: ecsemu.CodeInternalError, Rate: 0.1}},
		ENIConf: lab.ENIConf{MinPoolSize: 0, MaxPoolSize: 3}})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// After start-up (the agent refuses to start on credentials the cloud rejects): the
	// refused signature and the unknown key fire twice each, on the calls pods make.
	emu := l.Emulator()
	emu.InjectFault(ecsemu.Fault{Code: ecsemu.CodeSignatureDoesNotMatch, Count: 2})
	emu.InjectFault(ecsemu.Fault{Code: ecsemu.CodeInvalidAccessKeyID, Count: 2})
	for i := 0; i < 10; i++ {
		if s := emu.Snapshot(); s.Errors[ecsemu.CodeSignatureDoesNotMatch] >= 2 && s.Errors[ecsemu.CodeInvalidAccessKeyID] >= 2 {
			break
		}
		// Pods that fail on the injected errors are what this loop is for.
		if p, err := l.AddPod(ctx, 0, "default", fmt.Sprintf("probe-%d", i)); err == nil {
			if err := l.DeletePod(ctx, p); err != nil {
				t.Fatalf("delete pod %s: %v", p.Key(), err)
			}
		}
	}
	if s := emu.Snapshot(); s.Errors[ecsemu.CodeSignatureDoesNotMatch] == 0 || s.Errors[ecsemu.CodeInvalidAccessKeyID] == 0 {
		t.Fatalf("injected errors %v: the credential error paths were not exercised", s.Errors)
	}
	for _, p := range addPods(t, l, ctx, 0, 3) {
		if err := l.DeletePod(ctx, p); err != nil {
			t.Fatalf("delete pod %s: %v", p.Key(), err)
		}
	}
	logs, scrapes := checkNoSecrets(t, l)
	if logs == 0 || scrapes != 1 {
		t.Fatalf("looked at %d logs and %d /metrics scrapes, want the agent's log and its metrics", logs, scrapes)
	}
	// The check must see what it looks for: the agent's log is not empty.
	if b, err := os.ReadFile(l.Node(0).AgentLog()); err != nil || len(b) == 0 {
		t.Fatalf("agent log %s is empty or unreadable (%v): nothing was checked", l.Node(0).AgentLog(), err)
	}
}
