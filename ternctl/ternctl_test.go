package ternctl

import (
	"bytes"
	"context"
	"encoding/json"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// run runs ternctl with args and returns stdout, stderr and the exit code.
func run(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	code := Main(context.Background(), args, &out, &errb)
	return out.String(), errb.String(), code
}

func runJSON[T any](t *testing.T, args ...string) T {
	t.Helper()
	out, errs, code := run(t, append(args, "-o", "json")...)
	if code != 0 {
		t.Fatalf("ternctl %s: exit %d: %s", strings.Join(args, " "), code, errs)
	}
	var v T
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("ternctl %s -o json: %v\n%s", strings.Join(args, " "), err, out)
	}
	return v
}

// TestMapViewsFromPins: the map views read a loaded datapath's pins with no agent, in every
// output format, and filters select what they say.
func TestMapViewsFromPins(t *testing.T) {
	root := loadertest.PinRoot(t)
	d := loadertest.New(t, loader.Config{PinRoot: root})
	loadertest.PutService(t, d.Maps(), 3, "10.96.0.10", 80, packet.ProtoTCP, loadertest.B("10.0.2.21", 8080))
	loadertest.PutService(t, d.Maps(), 4, "10.96.0.11", 53, packet.ProtoUDP)
	syn := packet.Frame{Src: netip.MustParseAddr("10.0.1.10"), Dst: netip.MustParseAddr("10.96.0.10"), Proto: packet.ProtoTCP,
		SrcPort: 40000, DstPort: 80, TCPFlags: packet.SYN}.Build()
	if _, err := d.FromPod().Run(&ebpf.RunOptions{Data: syn, DataOut: make([]byte, 256)}); err != nil {
		t.Fatal(err)
	}
	pin := []string{"--pin-root", root, "--socket", filepath.Join(t.TempDir(), "none.sock")}

	svcs := runJSON[[]Service](t, append(pin, "service", "list")...)
	if len(svcs) != 2 || svcs[0].Frontend.String() != "10.96.0.10:80" || svcs[0].Proto != "TCP" ||
		len(svcs[0].Backends) != 1 || svcs[0].Backends[0].Address.String() != "10.0.2.21:8080" || len(svcs[1].Backends) != 0 {
		t.Errorf("service list: %+v", svcs)
	}
	lb := runJSON[[]LBEntry](t, append(pin, "bpf", "lb", "list")...)
	if len(lb) != 3 || lb[1].Map != loader.PodMapTernBackends || lb[1].MemberSlot != 1 {
		t.Errorf("bpf lb list: %+v", lb)
	}
	flows := runJSON[[]Flow](t, append(pin, "bpf", "ct", "list")...)
	if len(flows) != 2 || flows[0].Kind != "service" || flows[0].From.String() != "10.0.1.10:40000" ||
		flows[0].NATAddress.String() != "10.0.2.21:8080" || flows[0].ExpiresInSeconds <= 0 {
		t.Errorf("bpf ct list: %+v", flows)
	}
	if f := runJSON[[]Flow](t, append(pin, "bpf", "ct", "list", "--port", "8080", "--address", "10.0.2.21")...); len(f) != 2 {
		t.Errorf("bpf ct list --port 8080 --address 10.0.2.21: %d flows, want 2", len(f))
	}
	if f := runJSON[[]Flow](t, append(pin, "bpf", "ct", "list", "--pod", "10.9.9.9")...); len(f) != 0 {
		t.Errorf("bpf ct list --pod 10.9.9.9: %+v, want none", f)
	}
	ms := runJSON[[]Metric](t, append(pin, "bpf", "metrics", "list")...)
	if len(ms) != 1 || ms[0].Reason != "svc_forward" || ms[0].Direction != "from-pod" || ms[0].Packets != 1 || ms[0].Bytes != uint64(len(syn)) {
		t.Errorf("bpf metrics list: %+v", ms)
	}
	if eps := runJSON[[]Endpoint](t, append(pin, "bpf", "endpoint", "list")...); len(eps) != 0 {
		t.Errorf("bpf endpoint list: %+v, want none", eps)
	}

	out, _, code := run(t, append(pin, "service", "list")...)
	for _, s := range []string{"10.96.0.10:80/TCP", "1 => 10.0.2.21:8080 (active)", "10.96.0.11:53/UDP", "(none: rejects)"} {
		if code != 0 || !strings.Contains(out, s) {
			t.Errorf("service list table (exit %d) lacks %q:\n%s", code, s, out)
		}
	}
	out, _, code = run(t, append(pin, "bpf", "ct", "list", "-o", "yaml")...)
	if code != 0 || !strings.Contains(out, "natAddress: 10.0.2.21:8080") {
		t.Errorf("bpf ct list -o yaml (exit %d):\n%s", code, out)
	}
}

// TestExitCodes: scripts can tell a usage error, a missing agent and a missing datapath apart.
func TestExitCodes(t *testing.T) {
	dir := t.TempDir()
	pin := []string{"--pin-root", filepath.Join(dir, "no-pins"), "--socket", filepath.Join(dir, "none.sock")}
	for _, c := range []struct {
		args []string
		code int
		says string
	}{
		{[]string{"bogus"}, ExitUsage, "unknown command"},
		{[]string{"bpf", "bogus", "list"}, ExitUsage, "unknown command"},
		{[]string{"bpf"}, ExitUsage, "needs a subcommand"},
		{[]string{"service", "list", "-o", "xml"}, ExitUsage, "-o table"},
		{[]string{"bpf", "ct", "list", "--nope"}, ExitUsage, "unknown flag"},
		{[]string{"bpf", "ct", "list", "--address", "x"}, ExitUsage, "not an IP address"},
		{append(pin, "bpf", "ct", "list"), ExitNoDatapath, "is tern-agent running"},
		{append(pin, "ipam", "show"), ExitAgentDown, "is tern-agent running"},
		{append(pin, "bpf", "ct", "list", "--pod", "default/web"), ExitAgentDown, "pass its address"},
		{append(pin, "status"), ExitAgentDown, "does not answer"},
		{[]string{"completion", "bash"}, ExitOK, ""},
	} {
		_, errs, code := run(t, c.args...)
		if code != c.code || !strings.Contains(errs, c.says) {
			t.Errorf("ternctl %s: exit %d, stderr %q; want exit %d saying %q", strings.Join(c.args, " "), code, errs, c.code, c.says)
		}
	}
}
