package loader_test

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// Operators inspect tern with bpftool; every map must carry BTF so that a dump shows named
// fields rather than hex bytes.
func TestBpftoolPrettyPrintsMaps(t *testing.T) {
	bpftool, err := exec.LookPath("bpftool")
	if err != nil {
		testutil.SkipOrFail(t, "bpftool not installed (make setup installs it)")
	}
	root := loadertest.PinRoot(t)
	d := loadertest.New(t, loader.Config{PinRoot: root})
	loadertest.PutService(t, d.Maps(), 7, "10.96.0.10", 80, packet.ProtoTCP, loadertest.B("10.0.2.21", 8080))
	loadertest.Run(t, d.FromPod(), tcp(client, 40000, vip, 80, packet.SYN).Build())

	for name, fields := range map[string][]string{
		"tern_services":   {`"addr":`, `"port":`, `"proto": 6`, `"id": 7`, `"backend_count": 1`},
		"tern_backends":   {`"svc_id": 7`, `"slot": 1`},
		"tern_lb_members": {`"svc_id": 7`, `"addr":`},
		"tern_conntrack":  {`"addr_a":`, `"nat_port":`, `"expires_ns":`, `"nat_sport":`},
		"tern_metrics":    {`"packets": 1`},
	} {
		out, err := exec.Command(bpftool, "map", "dump", "pinned", filepath.Join(root, name)).CombinedOutput()
		if err != nil {
			t.Fatalf("bpftool map dump %s: %v\n%s", name, err, out)
		}
		for _, f := range fields {
			if !strings.Contains(string(out), f) {
				t.Errorf("bpftool dump of %s lacks %s:\n%s", name, f, out)
			}
		}
	}
}
