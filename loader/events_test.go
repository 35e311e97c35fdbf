package loader_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// TestDropEventsRateLimited: 600 drops in a burst (one BPF_PROG_TEST_RUN with Repeat, well
// under a millisecond) send the bucket's 200 events to tern_events and count the other 400
// as lost over the rate; each event carries the packet's reason, direction and addresses.
func TestDropEventsRateLimited(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	root := d.Config().PinRoot
	events, err := ebpf.LoadPinnedMap(root+"/"+loader.PodMapTernEvents, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer events.Close()
	rd, err := ringbuf.NewReader(events)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()

	src, dst := netip.MustParseAddr("10.0.1.10"), netip.MustParseAddr("10.96.0.10")
	bad := packet.Frame{Src: src, Dst: dst, Proto: packet.ProtoUDP, SrcPort: 4000, DstPort: 53}.Build()
	bad[packet.EthLen+2], bad[packet.EthLen+3] = 0, 10 // total length below the header
	const runs = 600
	start := time.Now()
	if _, err := d.FromPod().Run(&ebpf.RunOptions{Data: bad, Repeat: runs}); err != nil {
		t.Fatal(err)
	}
	// The bucket earns one event per EVENT_COST_NS (1 ms) of time: a run that takes longer
	// (a slow kernel under qemu's TCG takes several ms for 600 runs) may send that many more
	// than the burst. The wall time around the call bounds the time the runs took.
	earned := int(time.Since(start) / time.Millisecond)

	sent := 0
	for {
		rd.SetDeadline(time.Now()) // the events are in the buffer already: read what is there
		rec, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		var ev loader.DropEvent
		if len(rec.RawSample) != binary.Size(ev) {
			t.Fatalf("event of %d bytes, want %d", len(rec.RawSample), binary.Size(ev))
		}
		if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &ev); err != nil {
			t.Fatal(err)
		}
		if ev.Reason != loader.ReasonDropBadIP || ev.Dir != loader.DirFromPod || loader.BEToAddr(ev.Saddr) != src ||
			loader.BEToAddr(ev.Daddr) != dst || loader.BEToPort(ev.Sport) != 4000 || loader.BEToPort(ev.Dport) != 53 {
			t.Fatalf("event %+v", ev)
		}
		sent++
	}
	var per []loader.EventLimit
	lim, err := ebpf.LoadPinnedMap(root+"/"+loader.PodMapTernEventLimit, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer lim.Close()
	if err := lim.Lookup(uint32(0), &per); err != nil {
		t.Fatal(err)
	}
	var lostRate, lostFull uint64
	for _, p := range per {
		lostRate += p.LostRate
		lostFull += p.LostFull
	}
	// The burst is 200 events, plus what the run's time earned.
	if sent < 200 || sent > 200+earned+1 || uint64(sent)+lostRate != runs || lostFull != 0 {
		t.Errorf("%d drops in %d ms: %d events sent, %d lost over the rate, %d lost to a full buffer; want 200 sent (at most %d with the time the run took) and the rest lost over the rate",
			runs, earned, sent, lostRate, lostFull, 200+earned+1)
	}
}
