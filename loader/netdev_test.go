package loader_test

import (
	"bytes"
	"testing"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// TestNetdevPassesAndCounts: both netdev programs hand every frame back untouched with
// TC_ACT_OK and count each IPv4 packet (and its bytes) under pass and their own direction;
// an ARP frame passes uncounted; nothing is counted under the pod directions.
func TestNetdevPassesAndCounts(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	frames := map[string][]byte{
		"tcp syn":  tcp(client, 40000, vip, 80, packet.SYN).Build(),
		"udp":      udp(be1, 53, client, 40001, "answer").Build(),
		"fragment": packet.Frame{SrcMAC: podMAC, DstMAC: hostMAC, Src: client, Dst: be2, Proto: packet.ProtoUDP, SrcPort: 1, DstPort: 2, Payload: []byte("tail"), ID: 3, FragOffset: 64}.Build(),
	}
	arp := append(append(append([]byte{}, hostMAC[:]...), podMAC[:]...), 0x08, 0x06)
	arp = append(arp, make([]byte, 28)...)

	for _, c := range []struct {
		name string
		dir  loader.Direction
	}{{"tern_from_netdev", loader.DirFromNetdev}, {"tern_to_netdev", loader.DirToNetdev}} {
		prog := d.FromNetdev()
		if c.dir == loader.DirToNetdev {
			prog = d.ToNetdev()
		}
		var bytesIn uint64
		for name, f := range frames {
			v, out := loadertest.Run(t, prog, f)
			if v != verdictOK {
				t.Fatalf("%s on %s: verdict %d, want TC_ACT_OK", c.name, name, v)
			}
			if !bytes.Equal(out[:len(f)], f) {
				t.Fatalf("%s changed the %s frame:\n got %x\nwant %x", c.name, name, out[:len(f)], f)
			}
			bytesIn += uint64(len(f))
		}
		if v, out := loadertest.Run(t, prog, arp); v != verdictOK || !bytes.Equal(out[:len(arp)], arp) {
			t.Fatalf("%s on ARP: verdict %d, frame changed %v", c.name, v, !bytes.Equal(out[:len(arp)], arp))
		}
		tot, err := m.MetricsTotals()
		if err != nil {
			t.Fatal(err)
		}
		got := tot[loader.MetricsKey{Reason: loader.ReasonPass, Dir: c.dir}]
		if got.Packets != uint64(len(frames)) || got.Bytes != bytesIn {
			t.Fatalf("%s counted %d packets / %d bytes under pass/%s, want %d / %d (IPv4 frames only)",
				c.name, got.Packets, got.Bytes, c.dir, len(frames), bytesIn)
		}
	}
	tot, err := m.MetricsTotals()
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range tot {
		if k.Dir != loader.DirFromNetdev && k.Dir != loader.DirToNetdev || k.Reason != loader.ReasonPass {
			t.Errorf("unexpected counter %s/%s = %d packets", k.Reason, k.Dir, v.Packets)
		}
	}
}
