// Command datapath measures the per-packet cost of the pod programs with BPF_PROG_TEST_RUN,
// side by side with a do-nothing tc program in the same run, and the time to load Services
// into the maps from desired state. It prints a Markdown report (see docs/benchmarks.md).
//
// Every test run gets a fresh copy of the packet (one run per syscall): with Repeat the
// kernel reuses one skb, so a DNAT would turn the second run into non-service traffic. The
// kernel's own per-run duration is used, which includes its clock reads; the no-op program
// pays them too, so "over no-op" is the program's own cost.
package main

import (
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/service"
)

func main() {
	rounds := flag.Int("rounds", 7, "interleaved rounds; medians are over rounds")
	batch := flag.Int("batch", 20000, "test runs per scenario per round")
	png := flag.String("png", "", "also draw the medians into this PNG file")
	flag.Parse()
	if err := run(*rounds, *batch, *png); err != nil {
		fmt.Fprintln(os.Stderr, "datapath bench:", err)
		os.Exit(1)
	}
}

type scenario struct {
	name string
	prog *ebpf.Program
	next func(i int) []byte
	ns   []float64
}

func vipOf(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(96 + i>>16), byte(i >> 8), byte(i)})
}

func backendOf(i, j int) service.Backend {
	return service.Backend{Addr: netip.AddrFrom4([4]byte{172, byte(16 + i>>16), byte(i >> 8), byte(i)}), Port: uint16(8000 + j)}
}

func desired(n int) service.State {
	st := make(service.State, n)
	for i := 0; i < n; i++ {
		st[service.Frontend{Addr: vipOf(i), Port: 80, Proto: service.TCP}] = []service.Backend{backendOf(i, 0), backendOf(i, 1)}
	}
	return st
}

func pinRoot() string {
	var b [6]byte
	rand.Read(b[:])
	return filepath.Join("/sys/fs/bpf", "tern-bench-"+hex.EncodeToString(b[:]))
}

type loaded struct {
	dp    *loader.Datapath
	root  string
	n     int
	load  time.Duration
	write uint64
}

func loadWith(n int) (*loaded, error) {
	root := pinRoot()
	dp, err := loader.Load(loader.Config{PinRoot: root})
	if err != nil {
		return nil, err
	}
	r, err := service.NewReconciler(dp.Maps(), nil)
	if err != nil {
		return nil, err
	}
	st := desired(n)
	start := time.Now()
	if err := r.Sync(st); err != nil {
		return nil, err
	}
	return &loaded{dp: dp, root: root, n: n, load: time.Since(start), write: r.Writes()}, nil
}

func (l *loaded) close() {
	l.dp.Close()
	loader.RemovePins(l.root)
}

func frame(src netip.Addr, sport uint16, dst netip.Addr, flags uint8) []byte {
	return packet.Frame{SrcMAC: [6]byte{2, 0, 0, 0, 0, 1}, DstMAC: [6]byte{2, 0, 0, 0, 0, 2},
		Src: src, Dst: dst, Proto: packet.ProtoTCP, SrcPort: sport, DstPort: 80, TCPFlags: flags}.Build()
}

// runBatch runs prog batch times and returns the mean kernel-reported ns per run.
func runBatch(s *scenario, batch int) (float64, error) {
	var total time.Duration
	for i := 0; i < batch; i++ {
		_, d, err := s.prog.Benchmark(s.next(i), 1, nil)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", s.name, err)
		}
		total += d
	}
	return float64(total.Nanoseconds()) / float64(batch), nil
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func run(rounds, batch int, png string) error {
	noopObjs := loader.NoopObjects{}
	if err := loader.LoadNoopObjects(&noopObjs, nil); err != nil {
		return fmt.Errorf("load no-op program: %w", err)
	}
	defer noopObjs.Close()

	sizes := []int{1, 1000, 100000}
	var all []*loaded
	defer func() {
		for _, l := range all {
			l.close()
		}
	}()
	client := netip.MustParseAddr("10.0.1.10")
	established := frame(client, 40000, vipOf(0), packet.ACK)
	nonSvc := frame(client, 40000, netip.MustParseAddr("192.168.7.7"), packet.ACK)
	scenarios := []*scenario{{name: "no-op tc program", prog: noopObjs.TernNoop,
		next: func(int) []byte { return established }}}
	for _, n := range sizes {
		l, err := loadWith(n)
		if err != nil {
			return fmt.Errorf("load %d services: %w", n, err)
		}
		all = append(all, l)
		target := vipOf(n / 2)
		est := frame(client, 40000, target, packet.ACK)
		// Prime the established flow's conntrack entry.
		if _, err := l.dp.FromPod().Run(&ebpf.RunOptions{Data: est, DataOut: make([]byte, 256)}); err != nil {
			return err
		}
		// New flows: a different client address and port every run, so each is a CT miss.
		counter := 0
		scenarios = append(scenarios,
			&scenario{name: fmt.Sprintf("new flow, %d services", n), prog: l.dp.FromPod(), next: func(int) []byte {
				counter++
				src := netip.AddrFrom4([4]byte{10, 2, byte(counter >> 16), byte(counter >> 8)})
				return frame(src, uint16(1024+counter%60000), target, packet.SYN)
			}},
			&scenario{name: fmt.Sprintf("established flow, %d services", n), prog: l.dp.FromPod(),
				next: func(int) []byte { return est }},
			&scenario{name: fmt.Sprintf("non-service packet, %d services", n), prog: l.dp.FromPod(),
				next: func(int) []byte { return nonSvc }},
		)
	}
	for r := 0; r < rounds; r++ {
		// Rotate the order every round so no scenario always runs first (cache, frequency).
		for i := range scenarios {
			s := scenarios[(i+r)%len(scenarios)]
			ns, err := runBatch(s, batch)
			if err != nil {
				return err
			}
			s.ns = append(s.ns, ns)
		}
	}

	med := map[string]float64{}
	fmt.Printf("| scenario | median ns/packet | over no-op (ns) |\n|---|---:|---:|\n")
	noop := median(scenarios[0].ns)
	for _, s := range scenarios {
		m := median(s.ns)
		med[s.name] = m
		fmt.Printf("| %s | %.1f | %.1f |\n", s.name, m, m-noop)
	}
	fmt.Println()
	for _, kind := range []string{"new flow", "established flow"} {
		one, big := med[kind+", 1 services"], med[kind+", 100000 services"]
		fmt.Printf("- %s: cost(100k services) / cost(1 service) = %.3f raw, %.3f over no-op\n",
			kind, big/one, (big-noop)/(one-noop))
	}
	fmt.Printf("- established flow (1 service) / no-op program = %.2f\n", med["established flow, 1 services"]/noop)
	fmt.Println()
	fmt.Printf("| services loaded from desired state | time | map writes |\n|---:|---:|---:|\n")
	for _, l := range all {
		fmt.Printf("| %d | %s | %d |\n", l.n, l.load.Round(time.Millisecond), l.write)
	}
	fmt.Printf("\n(%d rounds x %d runs per scenario, interleaved; kernel-reported duration, one run per syscall)\n", rounds, batch)
	if png != "" {
		return writePlot(png, sizes, med, noop)
	}
	return nil
}
