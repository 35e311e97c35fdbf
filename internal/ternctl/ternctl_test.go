package ternctl

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
	"text/tabwriter"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

func TestTablesFromPinnedMaps(t *testing.T) {
	root := loadertest.PinRoot(t)
	d := loadertest.New(t, loader.Config{PinRoot: root})
	loadertest.PutService(t, d.Maps(), 3, "10.96.0.10", 80, packet.ProtoTCP, loadertest.B("10.0.2.21", 8080))
	loadertest.PutService(t, d.Maps(), 4, "10.96.0.11", 53, packet.ProtoUDP)
	syn := packet.Frame{Src: netipMust("10.0.1.10"), Dst: netipMust("10.96.0.10"), Proto: packet.ProtoTCP,
		SrcPort: 40000, DstPort: 80, TCPFlags: packet.SYN}.Build()
	if _, err := d.FromPod().Run(&ebpf.RunOptions{Data: syn, DataOut: make([]byte, 256)}); err != nil {
		t.Fatal(err)
	}

	m, err := loader.OpenPinnedMaps(root)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for name, fn := range map[string]func(*tabwriter.Writer, *loader.Maps) error{"services": services, "flows": flows, "metrics": metrics} {
		var buf bytes.Buffer
		w := tabwriter.NewWriter(&buf, 2, 4, 2, ' ', 0)
		if err := fn(w, m); err != nil {
			t.Fatal(err)
		}
		w.Flush()
		out := buf.String()
		want := map[string][]string{
			"services": {"10.96.0.10:80/TCP", "10.0.2.21:8080", "10.96.0.11:53/UDP", "(none: rejects)"},
			"flows":    {"10.0.1.10:40000", "10.96.0.10:80", "10.0.2.21:8080", "new"},
			"metrics":  {"from-pod", "svc_forward", "1"},
		}[name]
		for _, s := range want {
			if !strings.Contains(out, s) {
				t.Errorf("%s output lacks %q:\n%s", name, s, out)
			}
		}
	}
}

func netipMust(s string) netip.Addr { return netip.MustParseAddr(s) }
