package loader_test

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// skbLayout is where __sk_buff keeps tstamp, read from the object's BTF so that the test
// does not hard-code the kernel UAPI layout.
type skbLayout struct{ size, tstamp int }

func skbFields(t *testing.T) skbLayout {
	t.Helper()
	spec, err := loader.LoadPod()
	if err != nil {
		t.Fatal(err)
	}
	var s *btf.Struct
	if err := spec.Types.TypeByName("__sk_buff", &s); err != nil {
		t.Fatalf("find __sk_buff in the pod object's BTF: %v", err)
	}
	for _, m := range s.Members {
		if m.Name == "tstamp" {
			return skbLayout{size: int(s.Size), tstamp: int(m.Offset.Bytes())}
		}
	}
	t.Fatal("__sk_buff has no tstamp member")
	return skbLayout{}
}

// runStamped runs prog once on frame (skb->ifindex is the loopback's, 1) and returns the
// verdict and the skb's tstamp as the program left it.
func runStamped(t *testing.T, prog *ebpf.Program, l skbLayout, frame []byte) (uint32, uint64) {
	t.Helper()
	ctxIn := make([]byte, l.size)
	ctxOut := make([]byte, l.size)
	opts := &ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+256), Context: ctxIn, ContextOut: ctxOut}
	ret, err := prog.Run(opts)
	if err != nil {
		t.Fatalf("test run: %v", err)
	}
	return ret, binary.LittleEndian.Uint64(ctxOut[l.tstamp:])
}

// BPF_PROG_TEST_RUN gives the skb the loopback device: the programs see ifindex 1.
const testRunIfindex = 1

func putBW(t *testing.T, m *loader.Maps, egress, ingress loader.BWDir) {
	t.Helper()
	if err := m.PutBandwidth(loader.BWKey{Ifindex: testRunIfindex}, loader.BWValue{Egress: egress, Ingress: ingress}); err != nil {
		t.Fatal(err)
	}
}

func monoNow(t *testing.T) uint64 {
	t.Helper()
	now, err := monotonicNS()
	if err != nil {
		t.Fatal(err)
	}
	return now
}

// lineNext reads the "next free" time the programs keep for the test pod in one direction.
func lineNext(t *testing.T, m *loader.Maps, ingress bool) uint64 {
	t.Helper()
	var v loader.BWValue
	if err := m.Bandwidth.Lookup(loader.BWKey{Ifindex: testRunIfindex}, &v); err != nil {
		t.Fatal(err)
	}
	if ingress {
		return v.Ingress.Next
	}
	return v.Egress.Next
}

// The checks below are exact without trusting the wall clock to stand still: each run is
// bracketed by two clock reads a ≤ now ≤ b, and the test keeps its own model of the line
// ("next free"). Where [a, b] leaves the outcome certain (the line busy past b, or free
// before a) the program must do exactly that; in between either outcome is allowed, and the
// model follows what the map says. So a slow or descheduled run (qemu TCG on a busy host)
// widens what is allowed but never fails a correct program, and a wrong rate, a missing
// stamp or a wrong drop fails on any machine.

// TestBandwidthEDTStampsDeparturesAtTheRate sends back-to-back packets of one pod through
// tern_from_pod in EDT mode and checks each departure time: every packet sent while the
// line is busy departs exactly len/rate after the one before; one sent while it is free
// departs at once (unstamped); a packet whose departure would lie beyond the horizon is
// dropped and counted, leaving the schedule as it was.
func TestBandwidthEDTStampsDeparturesAtTheRate(t *testing.T) {
	// 1 Mbit/s: a 1000-byte packet books the line for 8 ms.
	const (
		rate    = 125_000 // bytes/s
		horizon = 200 * time.Millisecond
	)
	d := loadertest.New(t, loader.Config{BandwidthEDT: true})
	l := skbFields(t)
	frame := udp(client, 40000, netip.MustParseAddr("192.0.2.1"), 53, string(make([]byte, 958))).Build()
	cost := uint64(len(frame)) * uint64(time.Second) / rate // 8 ms for 1000 bytes
	putBW(t, d.Maps(), loader.BWDir{Rate: rate, BurstNs: uint64(horizon)}, loader.BWDir{})

	model := uint64(0) // the line is free
	stamped, passed := 0, 0
	for i := 0; ; i++ {
		if i == 2000 {
			t.Fatalf("no horizon drop after %d packets (%d stamped)", i, stamped)
		}
		a := monoNow(t)
		ret, ts := runStamped(t, d.FromPod(), l, frame)
		b := monoNow(t)
		got := lineNext(t, d.Maps(), false)
		if ret == verdictShot {
			// Only a departure beyond the horizon for some now in [a, b] may be dropped.
			if model <= a || model-a <= uint64(horizon) {
				t.Fatalf("packet %d dropped although its departure %d lay within the horizon (now %d..%d)", i, model, a, b)
			}
			if got != model {
				t.Fatalf("the drop of packet %d moved the line from %d to %d", i, model, got)
			}
			break
		}
		if ret != verdictOK {
			t.Fatalf("packet %d: verdict %d, want pass", i, ret)
		}
		if model > b && model-b > uint64(horizon) {
			t.Fatalf("packet %d passed with its departure %v ahead, beyond the %v horizon", i, time.Duration(model-b), horizon)
		}
		if ts != 0 {
			if ts != model {
				t.Fatalf("packet %d departs at %d, want %d: the previous departure plus len/rate (%d ns)", i, ts, model, cost)
			}
			if got != model+cost {
				t.Fatalf("after packet %d the line is free at %d, want %d", i, got, model+cost)
			}
			stamped++
		} else {
			if model > b {
				t.Fatalf("packet %d left unstamped although the line was busy until %d (now ≤ %d)", i, model, b)
			}
			if lo := max(model, a) + cost; got < lo || got > b+cost {
				t.Fatalf("after unstamped packet %d the line is free at %d, want now+len/rate in %d..%d", i, got, lo, b+cost)
			}
		}
		model = got
		passed++
	}
	if stamped == 0 {
		t.Fatal("no packet was stamped")
	}
	if n := loadertest.Metric(t, d.Maps(), loader.ReasonDropBWHorizon, loader.DirFromPod); n != 1 {
		t.Fatalf("drop_bw_horizon from-pod = %d, want 1", n)
	}
	if n := loadertest.Metric(t, d.Maps(), loader.ReasonBWPaced, loader.DirFromPod); n != uint64(stamped) {
		t.Fatalf("bw_paced from-pod = %d, want %d", n, stamped)
	}
	t.Logf("%d packets passed (%d stamped at 8 ms intervals), then the horizon dropped one", passed, stamped)

	// A pod without a limit in this direction, and what it receives, are never stamped.
	ret, ts := runStamped(t, d.ToPod(), l, frame)
	if ret != verdictOK || ts != 0 {
		t.Fatalf("to-pod with no ingress limit: verdict %d tstamp %d, want pass unstamped", ret, ts)
	}
}

// TestBandwidthPolicerBurstThenRate: in policer mode a pod's packets pass up to the burst,
// then the policer admits exactly what the rate earns: each verdict is checked against the
// token bucket (GCRA) model. Both directions.
func TestBandwidthPolicerBurstThenRate(t *testing.T) {
	// 1 Mbit/s: 8 ms per 1000-byte packet.
	const (
		rate  = 125_000 // bytes/s
		burst = 50_000  // bytes
	)
	d := loadertest.New(t, loader.Config{})
	l := skbFields(t)
	frame := udp(client, 40000, netip.MustParseAddr("192.0.2.1"), 53, string(make([]byte, 958))).Build()
	size := uint64(len(frame))
	cost := size * uint64(time.Second) / rate
	burstNS := uint64(burst) * uint64(time.Second) / rate
	for _, dir := range []struct {
		name    string
		prog    *ebpf.Program
		ingress bool
		counted loader.Direction
	}{
		{"egress", d.FromPod(), false, loader.DirFromPod},
		{"ingress", d.ToPod(), true, loader.DirToPod},
	} {
		t.Run(dir.name, func(t *testing.T) {
			lim := loader.BWDir{Rate: rate, BurstNs: burstNS}
			if dir.ingress {
				putBW(t, d.Maps(), loader.BWDir{}, lim)
			} else {
				putBW(t, d.Maps(), lim, loader.BWDir{})
			}
			dropsBefore := loadertest.Metric(t, d.Maps(), loader.ReasonDropBWPoliced, dir.counted)
			model, dropped := uint64(0), uint64(0)
			// step sends one packet and checks the verdict against the bucket: for now in
			// [a, b] it passes iff max(next-now, 0) + len/rate ≤ burst.
			step := func(i int) bool {
				a := monoNow(t)
				ret, ts := runStamped(t, dir.prog, l, frame)
				b := monoNow(t)
				got := lineNext(t, d.Maps(), dir.ingress)
				if ts != 0 {
					t.Fatalf("packet %d: the policer stamped a departure time (%d)", i, ts)
				}
				ahead := func(now uint64) uint64 { return max(model, now) - now + cost }
				switch ret {
				case verdictOK:
					if ahead(b) > burstNS {
						t.Fatalf("packet %d passed with the line booked %v ahead, over the %v bucket", i, time.Duration(ahead(b)), time.Duration(burstNS))
					}
					if lo, hi := max(model, a)+cost, max(model, b)+cost; got < lo || got > hi {
						t.Fatalf("after packet %d the line is free at %d, want %d..%d", i, got, lo, hi)
					}
					model = got
					return true
				case verdictShot:
					if ahead(a) <= burstNS {
						t.Fatalf("packet %d dropped with the line booked only %v ahead (bucket %v)", i, time.Duration(ahead(a)), time.Duration(burstNS))
					}
					if got != model {
						t.Fatalf("the drop of packet %d moved the line from %d to %d", i, model, got)
					}
					dropped++
					return false
				}
				t.Fatalf("packet %d: verdict %d", i, ret)
				return false
			}

			// The burst: back-to-back packets pass until the bucket is empty.
			n := 0
			for step(n) {
				if n++; n > 2000 {
					t.Fatal("no drop after 2000 packets: the policer does not limit")
				}
			}
			if n < burst/int(size)-1 {
				t.Fatalf("burst passed %d packets, want at least %d (%d B)", n, burst/int(size)-1, burst)
			}
			// Then the rate. Rather than wait, age the line: moving its "next free" time
			// back by ten packet times is ten packets' worth of elapsed time; at least ten
			// more pass (the model checks each), then the policer drops again. Five rounds.
			key := loader.BWKey{Ifindex: testRunIfindex}
			for round := 0; round < 5; round++ {
				var v loader.BWValue
				if err := d.Maps().Bandwidth.Lookup(key, &v); err != nil {
					t.Fatal(err)
				}
				line := &v.Egress
				if dir.ingress {
					line = &v.Ingress
				}
				line.Next -= 10*cost + cost/2
				model = line.Next
				if err := d.Maps().Bandwidth.Put(key, v); err != nil {
					t.Fatal(err)
				}
				got := 0
				for step(got) {
					if got++; got > 2000 {
						t.Fatal("no drop after 2000 packets: the policer stopped limiting")
					}
				}
				if got < 10 {
					t.Fatalf("round %d: %d packets passed after ten packet times, want at least 10", round, got)
				}
			}
			if got := loadertest.Metric(t, d.Maps(), loader.ReasonDropBWPoliced, dir.counted) - dropsBefore; got != dropped {
				t.Fatalf("drop_bw_policed %s = %d, want %d", dir.counted, got, dropped)
			}
		})
	}
}
