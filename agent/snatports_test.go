package agent

import (
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tern-net/tern/datapath"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
)

// TestSNATPortsFollowTheNodesRange: the agent reads ip_local_port_range in its namespace and
// hands it to the loader; on a node whose range leaves too few ports it starts anyway, with
// no window and a warning that says what to change.
func TestSNATPortsFollowTheNodesRange(t *testing.T) {
	testutil.RequirePrivileged(t)
	for _, c := range []struct {
		sysctl string
		want   loader.PortRange
		warns  bool
	}{
		{"40000 50000", loader.PortRange{Min: 40000, Max: 50000}, false},
		{"1024 65535", loader.PortRange{Min: 1, Max: 0}, true},
	} {
		ns := testutil.NewNetNS(t)
		core, logs := observer.New(zap.WarnLevel)
		a := &Agent{log: zap.New(core)}
		var cfg loader.Config
		err := nsutil.Do(ns, func() error {
			if err := datapath.SetSysctl("net.ipv4.ip_local_port_range", c.sysctl); err != nil {
				return err
			}
			return a.snatPortsLoadConfig(&cfg)
		})
		if err != nil {
			t.Fatal(err)
		}
		if cfg.LocalPortRange != c.want {
			t.Errorf("ip_local_port_range %q: window %v, want %v", c.sysctl, cfg.LocalPortRange, c.want)
		}
		if got := logs.FilterMessageSnippet("ip_local_port_range").Len(); (got > 0) != c.warns {
			t.Errorf("ip_local_port_range %q: %d warnings naming the sysctl, want any: %v", c.sysctl, got, c.warns)
		}
	}
}
