package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoadConfigDurationsAndUnknownFields(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.json")
	os.WriteFile(good, []byte(`{"nodeName":"n1","instanceID":"i-1","allocateWait":"250ms","maintainInterval":3,
		"cloud":{"pollInterval":"10ms","backoffAttempts":4}}`), 0o600)
	c, err := LoadConfig(good)
	if err != nil {
		t.Fatal(err)
	}
	if time.Duration(c.AllocateWait) != 250*time.Millisecond || time.Duration(c.MaintainInterval) != 3*time.Second ||
		time.Duration(c.Cloud.PollInterval) != 10*time.Millisecond || c.Cloud.BackoffAttempts != 4 {
		t.Fatalf("parsed %+v", c)
	}
	bad := filepath.Join(dir, "bad.json")
	os.WriteFile(bad, []byte(`{"nodeNmae":"n1","instanceID":"i-1"}`), 0o600)
	if _, err := LoadConfig(bad); err == nil || !strings.Contains(err.Error(), "nodeNmae") {
		t.Fatalf("a misspelt field was accepted: %v", err)
	}
}

func TestNewReportsEveryMissingField(t *testing.T) {
	_, err := New(Config{SocketPath: "relative.sock"}, nil)
	if err == nil {
		t.Fatal("empty config accepted")
	}
	for _, want := range []string{"nodeName", "socketPath"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
	a, err := New(Config{NodeName: "n1", InstanceID: "i-1"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c := a.Config(); c.SocketPath != DefaultSocketPath || c.StatePath != DefaultStatePath || c.ClusterID != "default" {
		t.Errorf("defaults not applied: %+v", c)
	}
}
