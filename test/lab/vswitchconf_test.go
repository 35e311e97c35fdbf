//go:build linux

package lab_test

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/test/lab"
)

// reloadsOK reads tern_eniconfig_reloads_total{result="ok"} from the node's agent.
func reloadsOK(ctx context.Context, n *lab.Node) (int, error) {
	text, err := n.Client().Metrics(ctx)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, `tern_eniconfig_reloads_total{result="ok"} `); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return int(f), err
		}
	}
	return 0, nil
}

// updateENIConfAndWait rewrites eni_conf and waits until the agent has loaded it (its ok
// reload counter moves), so that the next ADD is served under the new file.
func updateENIConfAndWait(t *testing.T, ctx context.Context, n *lab.Node, c lab.ENIConf) {
	t.Helper()
	before, err := reloadsOK(ctx, n)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.UpdateENIConf(c); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		now, err := reloadsOK(ctx, n)
		if err != nil {
			t.Fatal(err)
		}
		if now > before {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not reload eni_conf within 20s (ok reloads %d, before %d)", now, before)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestUnknownVSwitchAtRunTimeIsAConfigError: eni_conf changed, while the agent runs, to a
// vSwitch the cloud does not know makes the next ADD that needs a new ENI fail with CNI code 7
// (invalid configuration: only an eni_conf change fixes it) naming the vSwitch, not 11 (try
// again later), on which the kubelet would retry in vain. Fixing eni_conf makes ADD work
// again, and nothing is left behind in the cloud.
func TestUnknownVSwitchAtRunTimeIsAConfigError(t *testing.T) {
	const unknown = "vsw-nobody-made-this"
	l := up(t, lab.Options{Nodes: 1, ENIConf: lab.ENIConf{MinPoolSize: 0, MaxPoolSize: 2}})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	n := l.Node(0)
	good := n.ENIConf()
	if st, err := n.Client().State(ctx); err != nil {
		t.Fatal(err)
	} else if st.Idle != 0 {
		t.Fatalf("the pool holds %d idle addresses; the test needs ADD to create an ENI", st.Idle)
	}

	bad := good
	bad.VSwitches = []string{unknown}
	updateENIConfAndWait(t, ctx, n, bad)
	_, err := l.AddPod(ctx, 0, "default", "needs-an-eni")
	te, ok := lab.CNIError(err)
	if !ok || te.Code != api.CodeInvalidConfig || !strings.Contains(te.Error(), unknown) {
		t.Fatalf("ADD with eni_conf naming the unknown vSwitch %s: %v; want CNI error %d (invalid config) naming it",
			unknown, err, api.CodeInvalidConfig)
	}
	t.Logf("ADD under the bad eni_conf: code %d: %v", te.Code, te)
	if m, err := n.Client().Metrics(ctx); err != nil || !strings.Contains(m, `tern_ipam_errors_total{cause="bad_vswitch"} `) {
		t.Errorf("tern_ipam_errors_total has no bad_vswitch cause after the failed ADD (%v)", err)
	}

	updateENIConfAndWait(t, ctx, n, good)
	p, err := l.AddPod(ctx, 0, "default", "after-the-fix")
	if err != nil {
		t.Fatalf("ADD after eni_conf is fixed: %v", err)
	}
	if !p.IP.IsValid() {
		t.Fatal("the pod added after the fix has no address")
	}
	settled(t, l, ctx)
}
