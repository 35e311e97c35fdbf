package loader_test

import (
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// BenchmarkServiceHitAgainstBase measures tern_from_pod on an established service flow's
// client packet (its SVC entry found, the deadline not moving: the common case), this
// build against another build of the pod object loaded beside it on the same pinned maps,
// alternating packet for packet so that the machine's load weighs on both alike. One
// BPF_PROG_TEST_RUN per packet (the DNAT rewrites the frame, so the kernel's repeat loop
// would measure a different flow after the first run); the time is the kernel's own
// measure of the program run, without the syscall, but with its two clock reads, which cost
// more than the program on some machines: a trivial program (tern_noop) runs in the same
// rotation, and the ratio is of the times less that floor. Run, with the base build from a
// commit:
//
//	git show <commit>:loader/pod_bpfel.o > /tmp/base_pod.o
//	TERN_BENCH_BASE_POD=/tmp/base_pod.o TERN_PRIVILEGED=1 go test ./loader -run '^$' -bench ServiceHitAgainstBase -benchtime 200000x
func BenchmarkServiceHitAgainstBase(b *testing.B) {
	path := os.Getenv("TERN_BENCH_BASE_POD")
	if path == "" {
		b.Skip("TERN_BENCH_BASE_POD names no base build of the pod object")
	}
	d := loadertest.New(b, loader.Config{})
	m := d.Maps()
	spec, err := ebpf.LoadCollectionSpec(path)
	if err != nil {
		b.Fatal(err)
	}
	if err := loader.ConfigurePodSpec(spec, d.Config()); err != nil {
		b.Fatal(err)
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: d.Config().PinRoot}})
	if err != nil {
		b.Fatal(err)
	}
	defer coll.Close()
	base := coll.Programs["tern_from_pod"]
	noopSpec, err := loader.LoadNoop()
	if err != nil {
		b.Fatal(err)
	}
	noopColl, err := ebpf.NewCollection(noopSpec)
	if err != nil {
		b.Fatal(err)
	}
	defer noopColl.Close()
	noop := noopColl.Programs[loader.NoopProgTernNoop]

	loadertest.PutService(b, m, 1, vip.String(), 80, packet.ProtoTCP, loadertest.B(be1.String(), 8080))
	for _, f := range []struct {
		prog *ebpf.Program
		fr   packet.Frame
	}{
		{d.FromPod(), tcp(client, 3000, vip, 80, packet.SYN)},
		{d.ToPod(), tcp(be1, 8080, client, 3000, packet.SYN|packet.ACK)},
		{d.FromPod(), tcp(client, 3000, vip, 80, packet.ACK)},
	} {
		if v, _ := loadertest.Run(b, f.prog, f.fr.Build()); v != verdictOK {
			b.Fatalf("opening the flow: verdict %d", v)
		}
	}
	frame := tcp(client, 3000, vip, 80, packet.ACK).Build()
	progs := []*ebpf.Program{base, d.FromPod(), noop}
	var total [3]time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for j, p := range progs {
			v, dur, err := p.Benchmark(frame, 1, nil)
			if err != nil || (v != verdictOK && p != noop) {
				b.Fatalf("run %d of build %d: verdict %d, %v", i, j, v, err)
			}
			total[j] += dur
		}
	}
	b.StopTimer()
	baseNs, newNs, floorNs := float64(total[0])/float64(b.N), float64(total[1])/float64(b.N), float64(total[2])/float64(b.N)
	b.ReportMetric(baseNs, "base-ns/pkt")
	b.ReportMetric(newNs, "this-ns/pkt")
	b.ReportMetric(floorNs, "noop-ns/pkt")
	b.ReportMetric(newNs-baseNs, "delta-ns/pkt")
	b.ReportMetric((newNs-floorNs)/(baseNs-floorNs), "ratio")
}
