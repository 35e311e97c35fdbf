package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policymap"
	"github.com/tern-net/tern/test/bench/progrun"

	"github.com/tern-net/tern/test/bench/hostinfo"
)

type params struct {
	rules    []int
	flows    int // established flows per direction
	newFlows int // new flows per direction per round
	peers    int
	rounds   int
	churn    int
}

const (
	subjectID   = policy.Identity(5000)
	firstPeerID = policy.Identity(10000)
	deniedID    = policy.Identity(99999)
	servicePort = 80
	tcActOK     = 0
	tcActShot   = 2
	frameLen    = packet.EthLen + 20 + 20
	// The context of a to-pod run: struct __sk_buff (UAPI, 192 bytes) with ingress_ifindex
	// at offset 36 set to another interface. Without it the packet looks as if it came
	// from the node's own stack, which policy always allows.
	skbCtxSize           = 192
	skbIngressIfindexOff = 36
)

// runCtx returns the test-run context for prog: to-pod packets arrive from elsewhere.
func (s *subject) runCtx(prog *ebpf.Program) []byte {
	if prog != s.to {
		return nil
	}
	ctx := make([]byte, skbCtxSize)
	binary.NativeEndian.PutUint32(ctx[skbIngressIfindexOff:], 5)
	return ctx
}

var (
	podAddr    = netip.MustParseAddr("10.0.0.1")
	deniedPeer = netip.MustParseAddr("10.63.255.1")
	podMAC     = [6]byte{2, 0, 0, 0, 0, 1}
	hostMAC    = [6]byte{2, 0, 0, 0, 0, 2}
)

func peerAddr(k int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 64 + byte(k>>16), byte(k >> 8), byte(k)})
}

// peerID is peer k's identity: the rules allow identities firstPeerID..+rules-1, and every
// peer maps onto one of them, so every flow is allowed by exactly one rule.
func peerID(k, rules int) policy.Identity {
	return firstPeerID + policy.Identity(k%max(rules, 100))
}

func tcpFrame(src netip.Addr, sport uint16, dst netip.Addr, dport uint16, flags uint8) []byte {
	return packet.Frame{SrcMAC: podMAC, DstMAC: hostMAC, Src: src, Dst: dst, Proto: packet.ProtoTCP,
		SrcPort: sport, DstPort: dport, TCPFlags: flags, Seq: 1000, Ack: 2000}.Build()
}

// frames is a pool of frames of frameLen bytes, back to back.
type frames struct {
	buf []byte
	n   int
}

func (f *frames) add(b []byte) {
	if len(b) != frameLen {
		panic(fmt.Sprintf("frame of %d bytes, want %d", len(b), frameLen))
	}
	f.buf = append(f.buf, b...)
	f.n++
}

func (f *frames) at(i int) []byte { return f.buf[i*frameLen : (i+1)*frameLen] }

// flowTuple: flow i talks to peer i%peers from (or to) port portBase + i/peers, so tuples
// never repeat.
func flowTuple(i, peers int, portBase uint16) (netip.Addr, uint16) {
	return peerAddr(i % peers), portBase + uint16(i/peers)
}

// subject is one datapath: an endpoint with some number of rules.
type subject struct {
	rules    int
	dp       *loader.Datapath
	root     string
	from, to *ebpf.Program
	// measured frames: established (ACK) and, per round, new flows (SYN), per direction.
	estOut, estIn frames // from-pod (egress), to-pod (ingress)
	newOut, newIn frames // rounds x newFlows each
	// ns per packet per scenario per round.
	ns map[string][]float64
}

func (s *subject) Close() {
	if s.dp != nil {
		s.dp.Close()
	}
	loader.RemovePins(s.root)
}

func pinRoot() string {
	var b [6]byte
	rand.Read(b[:])
	return filepath.Join("/sys/fs/bpf", "tern-polbench-"+hex.EncodeToString(b[:]))
}

func loadSubject(p params, rules int) (*subject, error) {
	s := &subject{rules: rules, root: pinRoot(), ns: map[string][]float64{}}
	flows := 2*(p.flows+p.rounds*p.newFlows) + 1024
	dp, err := loader.Load(loader.Config{PinRoot: s.root, MaxFlows: uint32(flows + flows/4)})
	if err != nil {
		loader.RemovePins(s.root)
		return nil, fmt.Errorf("load datapath: %w", err)
	}
	s.dp, s.from, s.to = dp, dp.FromPod(), dp.ToPod()
	m, pm := dp.Maps(), dp.PolicyMaps()
	// The endpoint the programs serve in a test run (ifindex 1), enforcement on.
	if err := m.PutEndpoint(loader.EndpointKey{Ifindex: 1}, loader.EndpointValue{Addr: loader.AddrToBE(podAddr),
		Flags: loader.EndpointFlagPolicy, Identity: uint32(subjectID)}); err != nil {
		return s, err
	}
	for k := range p.peers {
		if err := m.PutIPCache(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(peerAddr(k))},
			loader.IPCacheValue{Identity: uint32(peerID(k, rules)), Flags: loader.IPCacheFlagPod}); err != nil {
			return s, fmt.Errorf("ipcache entry %d of %d: %w", k, p.peers, err)
		}
	}
	if err := m.PutIPCache(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(deniedPeer)},
		loader.IPCacheValue{Identity: uint32(deniedID), Flags: loader.IPCacheFlagPod}); err != nil {
		return s, err
	}
	if rules > 0 {
		d := &policy.Desired{Rules: map[policy.RuleKey]uint32{}, Isolation: map[policy.Identity]uint32{
			subjectID: policy.IsolatedIngress | policy.IsolatedEgress}}
		for i := range rules {
			for _, dir := range []policy.Direction{policy.Ingress, policy.Egress} {
				d.Rules[policy.RuleKey{Subject: subjectID, Peer: firstPeerID + policy.Identity(i), Dir: dir,
					Proto: packet.ProtoTCP, Port: servicePort, PortBits: 16}] = 0
			}
		}
		w, err := policymap.NewWriter(pm)
		if err != nil {
			return s, err
		}
		if _, err := w.Sync(policymap.Encode(d, policymap.Options{})); err != nil {
			return s, err
		}
	}
	return s, nil
}

// open establishes the subject's flows as real traffic does, checking every verdict:
// outgoing flows by the pod's SYN (from-pod) and the peer's SYN-ACK (to-pod), incoming
// flows by the peer's SYN (to-pod) and the pod's SYN-ACK (from-pod). It also checks that a
// peer no rule allows is dropped (with rules) or passed (without).
func (s *subject) open(ctx context.Context, p params) error {
	out := make([]byte, 256)
	run := func(prog *ebpf.Program, frame []byte, want uint32, what string) error {
		v, _, _, err := progrun.RunWithContext(prog, frame, out, s.runCtx(prog))
		if err != nil {
			return err
		}
		if v != want {
			return fmt.Errorf("%d rules: %s: verdict %d, want %d", s.rules, what, v, want)
		}
		return nil
	}
	wantDenied := uint32(tcActShot)
	if s.rules == 0 {
		wantDenied = tcActOK
	}
	if err := run(s.to, tcpFrame(deniedPeer, 999, podAddr, servicePort, packet.SYN), wantDenied, "SYN from a peer no rule allows"); err != nil {
		return err
	}
	if err := run(s.from, tcpFrame(podAddr, 999, deniedPeer, servicePort, packet.SYN), wantDenied, "SYN to a peer no rule allows"); err != nil {
		return err
	}
	for i := range p.flows {
		if i%4096 == 0 && ctx.Err() != nil {
			return ctx.Err()
		}
		peer, port := flowTuple(i, p.peers, 1024)
		if err := run(s.from, tcpFrame(podAddr, port, peer, servicePort, packet.SYN), tcActOK, "outgoing SYN"); err != nil {
			return err
		}
		if err := run(s.to, tcpFrame(peer, servicePort, podAddr, port, packet.SYN|packet.ACK), tcActOK, "SYN-ACK of an outgoing flow"); err != nil {
			return err
		}
		s.estOut.add(tcpFrame(podAddr, port, peer, servicePort, packet.ACK))
		if err := run(s.to, tcpFrame(peer, port, podAddr, servicePort, packet.SYN), tcActOK, "incoming SYN"); err != nil {
			return err
		}
		if err := run(s.from, tcpFrame(podAddr, servicePort, peer, port, packet.SYN|packet.ACK), tcActOK, "SYN-ACK of an incoming flow"); err != nil {
			return err
		}
		s.estIn.add(tcpFrame(peer, port, podAddr, servicePort, packet.ACK))
	}
	// New flows: ports above the established ones.
	base := 1024 + uint16(p.flows/p.peers) + 1
	for i := range p.rounds * p.newFlows {
		peer, port := flowTuple(i, p.peers, base)
		s.newOut.add(tcpFrame(podAddr, port, peer, servicePort, packet.SYN))
		s.newIn.add(tcpFrame(peer, port, podAddr, servicePort, packet.SYN))
	}
	return nil
}

// scenario names, in report order.
var scenarioNames = []string{"to-pod/first", "to-pod/established", "from-pod/first", "from-pod/established"}

// pass runs frames [from, to) once each through prog and returns the mean kernel ns per run.
func (s *subject) pass(prog *ebpf.Program, f *frames, from, to int, what string) (float64, error) {
	out := make([]byte, 256)
	ctx := s.runCtx(prog)
	var total uint64
	for i := from; i < to; i++ {
		v, _, ns, err := progrun.RunWithContext(prog, f.at(i), out, ctx)
		if err != nil {
			return 0, err
		}
		if v != tcActOK {
			return 0, fmt.Errorf("%s: frame %d: verdict %d, want it passed", what, i, v)
		}
		total += uint64(ns)
	}
	return float64(total) / float64(to-from), nil
}

type bench struct {
	p        params
	subjects []*subject
}

func (b *bench) Close() {
	for _, s := range b.subjects {
		s.Close()
	}
}

func setup(ctx context.Context, p params) (*bench, error) {
	b := &bench{p: p}
	for _, r := range p.rules {
		s, err := loadSubject(p, r)
		if s != nil {
			b.subjects = append(b.subjects, s)
		}
		if err != nil {
			return b, fmt.Errorf("datapath with %d rules: %w", r, err)
		}
		if err := s.open(ctx, p); err != nil {
			return b, err
		}
	}
	return b, nil
}

// measure runs every round through every datapath in turn, so each datapath's flows are
// cold again (the others' working sets went through the cache in between); the order of
// the datapaths rotates every round, so none is always first after the frame generator.
func (b *bench) measure(ctx context.Context) error {
	p := b.p
	for round := range p.rounds {
		for j := range b.subjects {
			s := b.subjects[(j+round)%len(b.subjects)]
			if ctx.Err() != nil {
				return ctx.Err()
			}
			nf := round * p.newFlows
			for _, c := range []struct {
				name     string
				prog     *ebpf.Program
				f        *frames
				from, to int
			}{
				{"to-pod/first", s.to, &s.newIn, nf, nf + p.newFlows},
				{"to-pod/established", s.to, &s.estIn, 0, p.flows},
				{"from-pod/first", s.from, &s.newOut, nf, nf + p.newFlows},
				{"from-pod/established", s.from, &s.estOut, 0, p.flows},
			} {
				ns, err := s.pass(c.prog, c.f, c.from, c.to, fmt.Sprintf("%d rules, %s, round %d", s.rules, c.name, round))
				if err != nil {
					return err
				}
				s.ns[c.name] = append(s.ns[c.name], ns)
			}
		}
	}
	return nil
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// mapBytes is the kernel memory of maps (their memlock in fdinfo; since Linux 6.4 the
// memory in use, not the maximum).
func mapBytes(ms ...*ebpf.Map) uint64 {
	var total uint64
	for _, m := range ms {
		b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", m.FD()))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "memlock:"); ok {
				n, _ := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
				total += n
			}
		}
	}
	return total
}

func mib(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func (b *bench) report(w io.Writer, command string, cr *compilerResult) {
	p := b.p
	_, llc := hostinfo.LLC()
	fmt.Fprintf(w, "Command: `%s` (%s, kernel %s, %s, %s).\n\n", command, time.Now().UTC().Format("2006-01-02"),
		hostinfo.KernelRelease(), hostinfo.CPUModel(), llc)
	var ws uint64
	for _, s := range b.subjects {
		m := s.dp.Maps()
		ws += mapBytes(m.CT, m.IPCache)
	}
	fmt.Fprintf(w, "Working set: %d datapaths, each %d established flows per direction and %d new ones per direction per round over %d peers; conntrack and ipcache maps %s in all, plus %s of frames; %d rounds, medians over rounds.\n\n",
		len(b.subjects), p.flows, p.newFlows, p.peers, mib(ws), mib(uint64(len(b.subjects)*(2*p.flows+2*p.rounds*p.newFlows)*frameLen)), p.rounds)
	fmt.Fprintln(w, "| rules on the endpoint | to-pod first packet | to-pod established | from-pod first packet | from-pod established | policy maps |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|")
	var base *subject
	for _, s := range b.subjects {
		if s.rules == 0 {
			base = s
		}
	}
	for _, s := range b.subjects {
		row := fmt.Sprintf("| %d |", s.rules)
		if s.rules == 0 {
			row = "| none (baseline) |"
		}
		for _, name := range scenarioNames {
			v := median(s.ns[name])
			if base != nil && s != base {
				row += fmt.Sprintf(" %.0f ns (×%.2f) |", v, v/median(base.ns[name]))
			} else {
				row += fmt.Sprintf(" %.0f ns |", v)
			}
		}
		pm := s.dp.PolicyMaps()
		row += fmt.Sprintf(" %s |", mib(mapBytes(pm.Rules, pm.Isolation, pm.CIDRs)))
		fmt.Fprintln(w, row)
	}
	fmt.Fprintln(w)
	cr.report(w)
}
