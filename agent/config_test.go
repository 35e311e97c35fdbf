package agent

import (
	"bytes"
	"context"
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

// A config typo must never cost a file: a socketPath that names a regular file, a symlink or
// the IPAM database is refused with an error naming it, and the file is left as it was.
func TestSocketPathNeverRemovesAFile(t *testing.T) {
	dir := t.TempDir()
	content := []byte("precious: not a socket\n")
	write := func(name string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, content, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	db := write("ipam.db")
	regular := write("notes.txt")
	link := filepath.Join(dir, "link.sock")
	if err := os.Symlink(regular, link); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, socket, state, want string
	}{
		{"socketPath is statePath", db, db, "socketPath and statePath are both"},
		{"socketPath is statePath spelt differently", filepath.Join(dir, "x", "..", "ipam.db"), db, "socketPath and statePath are both"},
		{"socketPath is a regular file", regular, filepath.Join(dir, "state", "ipam.db"), "exists and is not a socket"},
		{"socketPath is a symlink to a file", link, filepath.Join(dir, "state", "ipam.db"), "exists and is not a socket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{NodeName: "n1", InstanceID: "i-1", SocketPath: tc.socket, StatePath: tc.state,
				ENIConfigPath: filepath.Join(dir, "eni_conf")}
			a, err := New(cfg, nil)
			if err == nil {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				err = a.Run(ctx)
				cancel()
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), filepath.Base(tc.socket)) {
				t.Fatalf("got %v, want an error containing %q and naming the path", err, tc.want)
			}
			for _, p := range []string{db, regular} {
				b, err := os.ReadFile(p)
				if err != nil || !bytes.Equal(b, content) {
					t.Fatalf("%s after the refused start: %q, %v", p, b, err)
				}
			}
			if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
				t.Fatalf("symlink %s after the refused start: %v, %v", link, fi, err)
			}
		})
	}
}

func TestValidateRefusesNegativeDurations(t *testing.T) {
	c := Config{NodeName: "n1", AllocateWait: Duration(-5 * time.Second), Cloud: CloudTuning{PollInterval: Duration(-time.Millisecond)}}
	c.setDefaults()
	err := c.Validate()
	if err == nil || !strings.Contains(err.Error(), "allocateWait -5s is negative") || !strings.Contains(err.Error(), "cloud.pollInterval -1ms is negative") {
		t.Fatalf("Validate: %v", err)
	}
	c = Config{NodeName: "n1", AllocateWait: Duration(time.Second)}
	c.setDefaults()
	if err := c.Validate(); err != nil {
		t.Fatalf("a positive allocateWait refused: %v", err)
	}
}

// A shared directory such as /tmp would let anyone replace the socket; an existing private
// directory with a loose mode is tightened.
func TestSocketDirMode(t *testing.T) {
	dir := t.TempDir()
	shared := filepath.Join(dir, "shared")
	if err := os.Mkdir(shared, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(shared, 0o1777); err != nil {
		t.Fatal(err)
	}
	if err := prepareSocketDir(shared); err == nil || !strings.Contains(err.Error(), "is shared") {
		t.Fatalf("prepareSocketDir of a sticky world-writable dir: %v", err)
	}
	loose := filepath.Join(dir, "loose")
	if err := os.Mkdir(loose, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := prepareSocketDir(loose); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(loose); fi.Mode().Perm() != 0o700 {
		t.Fatalf("existing socket dir has mode %s, want 0700", fi.Mode().Perm())
	}
}

// Load-balancing options: both errors are reported at once, and valid values pass.
func TestValidateLoadBalancingOptions(t *testing.T) {
	c := Config{NodeName: "n1", LBAlgorithm: "roundrobin", MaglevTableSize: 1000}
	c.setDefaults()
	err := c.Validate()
	if err == nil || !strings.Contains(err.Error(), `lbAlgorithm: unknown load-balancing algorithm "roundrobin"`) ||
		!strings.Contains(err.Error(), "maglevTableSize: maglev table size 1000 is not one of") {
		t.Fatalf("Validate: %v", err)
	}
	c = Config{NodeName: "n1", LBAlgorithm: "maglev", MaglevTableSize: 16381}
	c.setDefaults()
	if err := c.Validate(); err != nil {
		t.Fatalf("valid load-balancing options refused: %v", err)
	}
}

func TestValidateForwarding(t *testing.T) {
	for _, f := range []string{"", "redirect", "stack"} {
		c := Config{NodeName: "n1", Forwarding: f}
		c.setDefaults()
		if err := c.Validate(); err != nil {
			t.Fatalf("forwarding %q refused: %v", f, err)
		}
	}
	c := Config{NodeName: "n1", Forwarding: "fast"}
	c.setDefaults()
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), `forwarding "fast" is not "redirect" or "stack"`) {
		t.Fatalf("Validate: %v", err)
	}
}

func TestValidateBandwidthMode(t *testing.T) {
	for mode, ok := range map[string]bool{"": true, "auto": true, "edt": true, "policer": true, "EDT": false, "tbf": false} {
		err := Config{NodeName: "n1", BandwidthMode: mode}.Validate()
		if ok != (err == nil) {
			t.Errorf("bandwidthMode %q: error %v, want accepted %v", mode, err, ok)
		}
		if err != nil && !strings.Contains(err.Error(), "want auto, edt or policer") {
			t.Errorf("bandwidthMode %q: error %q does not say what to write", mode, err)
		}
	}
}

func TestDaemonModeTerwaySpellings(t *testing.T) {
	for in, want := range map[string]string{"": ModeENIMultiIP, "ENIMultiIP": ModeENIMultiIP, "eniip": ModeENIMultiIP,
		"VPC": ModeVPC, "vpc": ModeVPC, "vpc-route": ModeVPC} {
		if got, ok := (Config{DaemonMode: in}).Mode(); !ok || got != want {
			t.Errorf("daemonMode %q → %q, %v; want %q", in, got, ok, want)
		}
	}
	base := Config{NodeName: "n1", SocketPath: "/run/t.sock", StatePath: "/var/lib/t.db", ENIConfigPath: "/etc/eni_conf"}
	for _, tc := range []struct {
		mode, podCIDR, kubeconfig, want string
	}{
		{"ENIOnly", "", "", "ENIOnly"},
		{"VPC", "", "", "needs the node's pod CIDR"},
		{"VPC", "10.244.1.1/24", "", "not a canonical IPv4 CIDR"},
	} {
		c := base
		c.DaemonMode, c.PodCIDR, c.Kubeconfig = tc.mode, tc.podCIDR, tc.kubeconfig
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("mode %q podCIDR %q: %v, want an error saying %q", tc.mode, tc.podCIDR, err, tc.want)
		}
	}
	for _, c := range []Config{{DaemonMode: "VPC", PodCIDR: "10.244.1.0/24"}, {DaemonMode: "VPC", Kubeconfig: "/etc/kubeconfig"}} {
		c.NodeName, c.SocketPath, c.StatePath, c.ENIConfigPath = base.NodeName, base.SocketPath, base.StatePath, base.ENIConfigPath
		if err := c.Validate(); err != nil {
			t.Errorf("%+v: %v", c, err)
		}
	}
}
