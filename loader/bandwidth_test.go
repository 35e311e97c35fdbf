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

// TestBandwidthEDTStampsDeparturesAtTheRate sends back-to-back packets of one pod through
// tern_from_pod in EDT mode and checks each departure time: the first leaves now, every
// next one exactly len/rate after the one before, and a packet whose departure would lie
// beyond the horizon is dropped and counted, leaving the schedule as it was.
func TestBandwidthEDTStampsDeparturesAtTheRate(t *testing.T) {
	// 1 Mbit/s: a 1000-byte packet books the line for 8 ms, far longer than a test run takes
	// even under qemu's TCG, so every packet finds the line still busy.
	const (
		rate    = 125_000 // bytes/s
		horizon = 200 * time.Millisecond
	)
	d := loadertest.New(t, loader.Config{BandwidthEDT: true})
	l := skbFields(t)
	frame := udp(client, 40000, netip.MustParseAddr("192.0.2.1"), 53, string(make([]byte, 958))).Build()
	cost := uint64(len(frame)) * uint64(time.Second) / rate // 8 ms for 1000 bytes
	putBW(t, d.Maps(), loader.BWDir{Rate: rate, BurstNs: uint64(horizon)}, loader.BWDir{})

	before := monoNow(t)
	var prev uint64
	passed := 0
	for i := 0; i < 40; i++ {
		ret, ts := runStamped(t, d.FromPod(), l, frame)
		if ret == verdictShot {
			break
		}
		if ret != verdictOK {
			t.Fatalf("packet %d: verdict %d, want pass", i, ret)
		}
		passed++
		switch {
		case i == 0:
			// The line was free: the packet leaves now and needs no stamp.
			if ts != 0 {
				t.Fatalf("packet 0 stamped %d, want unstamped (the line was free)", ts)
			}
		case i == 1:
			if ts < before+cost || ts > monoNow(t)+cost {
				t.Fatalf("packet 1 departs at %d, want one packet time (%d ns) after the first (sent at %d..now)", ts, cost, before)
			}
		default:
			if ts-prev != cost {
				t.Fatalf("packet %d departs %d ns after packet %d, want %d (len %d at %d B/s)", i, ts-prev, i-1, cost, len(frame), rate)
			}
		}
		prev = ts
	}
	// The horizon admits departures up to 200 ms ahead: 1 + 200ms/8ms = 26 packets, plus
	// one for each packet time the wall clock gained while the loop ran.
	elapsed := monoNow(t) - before
	if want := 1 + int(uint64(horizon)/cost); passed < want || passed > want+1+int(elapsed/cost) {
		t.Fatalf("%d packets passed before the horizon drop in %v, want %d (+%d)", passed, time.Duration(elapsed), want, 1+int(elapsed/cost))
	}
	if n := loadertest.Metric(t, d.Maps(), loader.ReasonDropBWHorizon, loader.DirFromPod); n != 1 {
		t.Fatalf("drop_bw_horizon from-pod = %d, want 1", n)
	}
	if n := loadertest.Metric(t, d.Maps(), loader.ReasonBWPaced, loader.DirFromPod); n != uint64(passed-1) {
		t.Fatalf("bw_paced from-pod = %d, want %d", n, passed-1)
	}
	v, err := d.Maps().DumpBandwidth()
	if err != nil {
		t.Fatal(err)
	}
	if got := v[loader.BWKey{Ifindex: testRunIfindex}].Egress.Next; got != prev+cost {
		t.Fatalf("line next free at %d after the drop, want %d (the last departure + one packet)", got, prev+cost)
	}

	// A pod without a limit in this direction, and what it receives, are never stamped.
	ret, ts := runStamped(t, d.ToPod(), l, frame)
	if ret != verdictOK || ts != 0 {
		t.Fatalf("to-pod with no ingress limit: verdict %d tstamp %d, want pass unstamped", ret, ts)
	}
}

// TestBandwidthPolicerBurstThenRate: in policer mode a pod's packets pass up to the burst,
// then the policer admits exactly what the rate earns. Both directions.
func TestBandwidthPolicerBurstThenRate(t *testing.T) {
	// 1 Mbit/s: 8 ms per 1000-byte packet, long against a test run even under TCG.
	const (
		rate  = 125_000 // bytes/s
		burst = 50_000  // bytes
	)
	d := loadertest.New(t, loader.Config{})
	l := skbFields(t)
	frame := udp(client, 40000, netip.MustParseAddr("192.0.2.1"), 53, string(make([]byte, 958))).Build()
	size := uint64(len(frame))
	burstNS := uint64(burst) * uint64(time.Second) / rate
	for _, dir := range []struct {
		name   string
		prog   *ebpf.Program
		lim    func(loader.BWDir) (loader.BWDir, loader.BWDir)
		reason loader.Direction
	}{
		{"egress", d.FromPod(), func(x loader.BWDir) (loader.BWDir, loader.BWDir) { return x, loader.BWDir{} }, loader.DirFromPod},
		{"ingress", d.ToPod(), func(x loader.BWDir) (loader.BWDir, loader.BWDir) { return loader.BWDir{}, x }, loader.DirToPod},
	} {
		t.Run(dir.name, func(t *testing.T) {
			e, i := dir.lim(loader.BWDir{Rate: rate, BurstNs: burstNS})
			putBW(t, d.Maps(), e, i)
			dropsBefore := loadertest.Metric(t, d.Maps(), loader.ReasonDropBWPoliced, dir.reason)

			// The burst: back-to-back packets pass until the bucket is empty.
			start := monoNow(t)
			n := uint64(0)
			for {
				ret, ts := runStamped(t, dir.prog, l, frame)
				if ts != 0 {
					t.Fatalf("policer stamped a departure time (%d)", ts)
				}
				if ret == verdictShot {
					break
				}
				n++
				if n > 1000 {
					t.Fatal("no drop after 1000 packets: the policer does not limit")
				}
			}
			elapsed := monoNow(t) - start
			// At least the burst, and no more than the burst plus what the line earned
			// while the loop ran (the loop may be descheduled on a busy machine).
			if most := (burst+rate*elapsed/uint64(time.Second))/size + 1; n < burst/size-1 || n > most {
				t.Fatalf("burst passed %d packets in %v, want %d..%d (burst %d B, %d B/s)", n, time.Duration(elapsed), burst/size-1, most, burst, rate)
			}

			// Then the rate. Rather than wait, age the line: moving its "next free" time
			// back by ten packet times plus a half is ten packets' worth of elapsed time, so
			// exactly ten more pass (eleven if the wall clock gains another half, 4 ms,
			// while the loop runs), then the policer drops again. Five rounds.
			dropped := uint64(1)
			key := loader.BWKey{Ifindex: testRunIfindex}
			for round := 0; round < 5; round++ {
				var v loader.BWValue
				if err := d.Maps().Bandwidth.Lookup(key, &v); err != nil {
					t.Fatal(err)
				}
				cost := size * uint64(time.Second) / rate
				line := &v.Egress
				if dir.reason == loader.DirToPod {
					line = &v.Ingress
				}
				line.Next -= 10*cost + cost/2
				if err := d.Maps().Bandwidth.Put(key, v); err != nil {
					t.Fatal(err)
				}
				got := 0
				for {
					ret, _ := runStamped(t, dir.prog, l, frame)
					if ret == verdictShot {
						dropped++
						break
					}
					if got++; got > 100 {
						t.Fatal("no drop after 100 packets: the policer stopped limiting")
					}
				}
				if got != 10 && got != 11 {
					t.Fatalf("round %d: %d packets passed after ten packet times, want 10 (or 11)", round, got)
				}
			}
			if got := loadertest.Metric(t, d.Maps(), loader.ReasonDropBWPoliced, dir.reason) - dropsBefore; got != dropped {
				t.Fatalf("drop_bw_policed %s = %d, want %d", dir.reason, got, dropped)
			}
		})
	}
}
