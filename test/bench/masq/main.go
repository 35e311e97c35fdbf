// Command masq measures the masquerade path of the netdev programs (bpf/lib/snat.h) with
// BPF_PROG_TEST_RUN: the per-packet cost of a new and an established masqueraded flow and of
// a restored reply, against plain forwarding (a pod's packet the netdev program passes
// untranslated) and the do-nothing tc program; and how port allocation behaves as one
// destination's port range fills (tries per allocation and failures at 50/90/99%
// occupancy). Root; it pins under a private bpffs directory and removes it.
//
//	go run ./test/bench/masq -flows 50000 -new 20000 -rounds 5 -allocs 3000
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	mrand "math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/test/bench/progrun"
)

var (
	nodeAddr = netip.MustParseAddr("10.0.0.10")
	vpcPeer  = netip.MustParseAddr("10.0.2.21")
)

const frameLen = 14 + 20 + 20

type params struct {
	flows, newFlows, rounds, allocs int
}

func main() {
	var p params
	flag.IntVar(&p.flows, "flows", 50000, "established masqueraded flows (and as many plain ones)")
	flag.IntVar(&p.newFlows, "new", 20000, "new masqueraded flows per round")
	flag.IntVar(&p.rounds, "rounds", 5, "interleaved rounds; figures are medians over rounds")
	flag.IntVar(&p.allocs, "allocs", 3000, "allocations measured per occupancy level")
	flag.Parse()
	if err := run(p); err != nil {
		fmt.Fprintln(os.Stderr, "masq bench:", err)
		os.Exit(1)
	}
}

func pinRoot() string {
	var b [6]byte
	rand.Read(b[:])
	return filepath.Join("/sys/fs/bpf", "tern-bench-masq-"+hex.EncodeToString(b[:]))
}

func tcpFrame(src netip.Addr, sport uint16, dst netip.Addr, dport uint16, flags uint8) []byte {
	return packet.Frame{Src: src, Dst: dst, Proto: packet.ProtoTCP, SrcPort: sport, DstPort: dport,
		TCPFlags: flags, Seq: 1, ID: 1}.Build()
}

// pod i of 256 local pods, a remote address outside the VPC for flow i.
func podAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 0, 1, byte(i % 256)}) }
func remote(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})
}

type pass struct {
	name   string
	prog   *ebpf.Program
	frames [][]byte
	check  func(v uint32, in, out []byte) error
	ns     []float64
}

func (ps *pass) run(out []byte) error {
	var sum float64
	for i, f := range ps.frames {
		v, o, ns, err := progrun.Run(ps.prog, f, out)
		if err != nil {
			return err
		}
		if ps.check != nil {
			if err := ps.check(v, f, o); err != nil {
				return fmt.Errorf("%s frame %d: %w", ps.name, i, err)
			}
		}
		sum += float64(ns)
	}
	ps.ns = append(ps.ns, sum/float64(len(ps.frames)))
	return nil
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func srcIs(want netip.Addr) func(uint32, []byte, []byte) error {
	return func(v uint32, _, out []byte) error {
		if v != 0 {
			return fmt.Errorf("verdict %d", v)
		}
		p, err := packet.Parse(out)
		if err != nil || !p.ChecksumsOK() || p.Src != want {
			return fmt.Errorf("source %s (checksums ok %v, err %v), want %s", p.Src, p.ChecksumsOK(), err, want)
		}
		return nil
	}
}

func unchanged(v uint32, in, out []byte) error {
	if v != 0 || !bytes.Equal(in, out[:len(in)]) {
		return errors.New("not passed untouched")
	}
	return nil
}

func run(p params) error {
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(0)
	_ = unix.SchedSetaffinity(0, &set)

	root := pinRoot()
	defer func() {
		if err := loader.RemovePins(root); err != nil {
			fmt.Fprintln(os.Stderr, "masq bench: remove its pins:", err)
		}
	}()
	d, err := loader.Load(loader.Config{PinRoot: root, MasqAddr: nodeAddr,
		MaxSNATFlows: uint32(p.flows + p.newFlows*p.rounds + 70000), MaxFlows: uint32(2*p.flows + p.newFlows*p.rounds + 70000)})
	if err != nil {
		return err
	}
	defer d.Close()
	var noop loader.NoopObjects
	if err := loader.LoadNoopObjects(&noop, nil); err != nil {
		return err
	}
	defer noop.Close()
	m := d.Maps()
	for i := 0; i < 256; i++ {
		if err := m.PutIPCache(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(podAddr(i))},
			loader.IPCacheValue{Flags: loader.IPCacheFlagLocal | loader.IPCacheFlagPod}); err != nil {
			return err
		}
	}
	if err := m.SetNonMasquerade([]netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}); err != nil {
		return err
	}
	out := make([]byte, frameLen+256)
	rng := mrand.New(mrand.NewPCG(1, 2))

	// Established flows: opened through the programs (SYN out, SYN-ACK back).
	est := make([][]byte, p.flows)
	replies := make([][]byte, p.flows)
	plain := make([][]byte, p.flows)
	for i := range p.flows {
		pod, sport, dst := podAddr(i), uint16(32768+rng.IntN(28000)), remote(i)
		if _, _, _, err := progrun.Run(d.ToNetdev(), tcpFrame(pod, sport, dst, 443, packet.SYN), out); err != nil {
			return err
		}
		_, o, _, err := progrun.Run(d.ToNetdev(), tcpFrame(pod, sport, dst, 443, packet.ACK), out)
		if err != nil {
			return err
		}
		wire, err := packet.Parse(o)
		if err != nil || wire.Src != nodeAddr {
			return fmt.Errorf("opening flow %d: not masqueraded (%v)", i, err)
		}
		est[i] = tcpFrame(pod, sport, dst, 443, packet.ACK)
		replies[i] = tcpFrame(dst, 443, nodeAddr, wire.SrcPort, packet.ACK)
		plain[i] = tcpFrame(pod, sport, vpcPeer, uint16(1024+i%60000), packet.ACK)
	}
	rng.Shuffle(len(est), func(i, j int) { est[i], est[j] = est[j], est[i] })
	passes := []*pass{
		{name: "no-op tc program", prog: noop.TernNoop, frames: est},
		{name: "plain forwarding (pod to a VPC address: passed)", prog: d.ToNetdev(), frames: plain, check: unchanged},
		{name: "SNAT established", prog: d.ToNetdev(), frames: est, check: srcIs(nodeAddr)},
		{name: "reply restore", prog: d.FromNetdev(), frames: replies, check: func(v uint32, _, o []byte) error {
			p, err := packet.Parse(o)
			if err != nil || v != 0 || !p.ChecksumsOK() || p.Dst == nodeAddr {
				return fmt.Errorf("not restored: dst %s err %v", p.Dst, err)
			}
			return nil
		}},
	}
	newPass := &pass{name: "SNAT new flow", prog: d.ToNetdev(), check: srcIs(nodeAddr)}
	for r := range p.rounds {
		newPass.frames = newPass.frames[:0]
		for i := range p.newFlows {
			newPass.frames = append(newPass.frames, tcpFrame(podAddr(i), uint16(1024+rng.IntN(64000)),
				remote(p.flows+r*p.newFlows+i), 443, packet.SYN))
		}
		order := append([]*pass{newPass}, passes...)
		// Rotate so no pass always follows the same one.
		k := r % len(order)
		order = append(order[k:], order[:k]...)
		for _, ps := range order {
			if err := ps.run(out); err != nil {
				return err
			}
		}
	}
	st, err := m.SNATStatsTotals()
	if err != nil {
		return err
	}
	// Established packets must find their translation, never allocate again.
	if want := uint64(p.flows + p.newFlows*p.rounds); st.Allocations != want {
		return fmt.Errorf("%d allocations after the passes, want %d (one per flow): established packets allocated", st.Allocations, want)
	}
	base := median(passes[0].ns)
	plainOwn := median(passes[1].ns) - base
	fmt.Printf("Per-packet cost: median over %d rounds of the mean kernel-reported ns per BPF_PROG_TEST_RUN (Repeat=1); %d established flows, %d new flows per round; own = minus the no-op program.\n\n", p.rounds, p.flows, p.newFlows)
	fmt.Println("| path | ns | own | own / plain forwarding own |")
	fmt.Println("|---|---:|---:|---:|")
	for _, ps := range append([]*pass{passes[0], passes[1], newPass}, passes[2:]...) {
		ns := median(ps.ns)
		ratio := "–"
		if ps != passes[0] {
			ratio = fmt.Sprintf("%.2f", (ns-base)/plainOwn)
		}
		fmt.Printf("| %s | %.1f | %.1f | %s |\n", ps.name, ns, ns-base, ratio)
	}
	return allocation(d, p, out)
}

// allocation fills one destination's port range to an occupancy, then measures new flows to
// it (each claimed port is given back so the occupancy holds).
func allocation(d *loader.Datapath, p params, out []byte) error {
	m := d.Maps()
	cfg := d.Config()
	dst := netip.MustParseAddr("198.51.100.7")
	other := loader.AddrToBE(netip.MustParseAddr("10.0.9.9"))
	fmt.Printf("\nPort allocation towards one destination (%s:443), range %d+%d, %d tries at most; %d allocations per level, each claimed port given back.\n\n",
		dst, cfg.SNATPortMin, cfg.SNATPortCount, cfg.SNATTries, p.allocs)
	fmt.Println("| occupancy | tries per allocation | failed (drop_snat_no_port) | ns per new flow |")
	fmt.Println("|---:|---:|---:|---:|")
	rng := mrand.New(mrand.NewPCG(3, 4))
	for _, occ := range []float64{0.5, 0.9, 0.99} {
		if err := clear(m.SNAT); err != nil {
			return err
		}
		if err := clear(m.CT); err != nil {
			return err
		}
		ports := make([]uint16, cfg.SNATPortCount)
		for i := range ports {
			ports[i] = cfg.SNATPortMin + uint16(i)
		}
		rng.Shuffle(len(ports), func(i, j int) { ports[i], ports[j] = ports[j], ports[i] })
		n := int(occ * float64(len(ports)))
		far := loader.MonotonicNow() + 3600e9
		var keys []loader.CTKey
		var vals []loader.SNATValue
		for i, port := range ports[:n] {
			keys = append(keys, loader.CTFlowKey(nodeAddr, port, dst, 443, packet.ProtoTCP))
			vals = append(vals, loader.SNATValue{ExpiresNs: far, OrigAddr: other, OrigPort: loader.PortToBE(uint16(i))})
		}
		if _, err := m.SNAT.BatchUpdate(keys, vals, nil); err != nil {
			return err
		}
		before, err := m.SNATStatsTotals()
		if err != nil {
			return err
		}
		var ns float64
		for i := range p.allocs {
			pod, sport := podAddr(i), uint16(1024+rng.IntN(64511))
			v, o, t, err := progrun.Run(d.ToNetdev(), tcpFrame(pod, sport, dst, 443, packet.SYN), out)
			if err != nil {
				return err
			}
			ns += float64(t)
			if v == 0 {
				wire, err := packet.Parse(o)
				if err != nil {
					return err
				}
				if err := m.SNAT.Delete(loader.CTFlowKey(nodeAddr, wire.SrcPort, dst, 443, packet.ProtoTCP)); err != nil {
					return fmt.Errorf("give back port %d: %w", wire.SrcPort, err)
				}
			}
			if err := m.CT.Delete(loader.CTFlowKey(pod, sport, dst, 443, packet.ProtoTCP)); err != nil && !loader.IsNotExist(err) {
				return err
			}
		}
		after, err := m.SNATStatsTotals()
		if err != nil {
			return err
		}
		allocs := after.Allocations - before.Allocations
		fails := after.Failures - before.Failures
		tries := float64(after.Tries-before.Tries) / float64(allocs+fails)
		fmt.Printf("| %.0f%% | %.2f | %.1f%% | %.1f |\n", occ*100, tries, 100*float64(fails)/float64(p.allocs), ns/float64(p.allocs))
	}
	return nil
}

// clear empties a hash map.
func clear(mp *ebpf.Map) error {
	var keys []loader.CTKey
	var k loader.CTKey
	var v []byte
	it := mp.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		return err
	}
	if len(keys) == 0 {
		return nil
	}
	_, err := mp.BatchDelete(keys, nil)
	return err
}
