package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	mrand "math/rand/v2"
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
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/lbmap"
	"github.com/tern-net/tern/test/bench/progrun"
)

const (
	tcpProto    = packet.ProtoTCP
	vipPort     = 80
	backendPort = 8080
	remotePort  = 9000
	frameLen    = packet.EthLen + 20 + 20 // Ethernet, IPv4, TCP without options
	tcActOK     = 0
	// Client source ports stay below the v2 collision range (61000+), so a changed port on
	// the wire would show up as a wrong reply rather than blend in.
	clientPortMin, clientPortMax = 1024, 60999
	clientPods                   = 256
)

// params is one benchmark run's shape.
type params struct {
	sizes    []int // Services per datapath
	fanout   int   // frontends sharing each backend in the shared-backend rows (v2)
	v1Fanout int   // the same for v1, whose reverse-NAT index holds at most 8
	flows    int   // established service flows per datapath
	nonSvc   int   // established non-service flows per datapath
	newFlows int   // new flows per datapath per round
	rounds   int
	v1Object string
	seed     uint64
	// forwarding is the v2 datapath's forward stage mode. Under BPF_PROG_TEST_RUN the skb
	// is on lo, whose forwarding is off, so with "redirect" every from-pod packet pays the
	// stage's endpoint and FIB lookups and then goes to the stack.
	forwarding loader.Forwarding
}

// topology: Service i is vipOf(i):80/TCP with two backends on port 8080; with fanout f,
// Services i and j share their two backends when i/f == j/f, so every backend serves f
// frontends (the last group may have fewer).
type topology struct {
	services, fanout int
}

func vipOf(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(96 + i>>16), byte(i >> 8), byte(i)})
}

func backendAddr(k int) netip.Addr {
	return netip.AddrFrom4([4]byte{172, byte(16 + k>>16), byte(k >> 8), byte(k)})
}

func (t topology) backends(i int) []netip.Addr {
	g := i / t.fanout
	return []netip.Addr{backendAddr(2 * g), backendAddr(2*g + 1)}
}

func (t topology) desired() service.State {
	st := make(service.State, t.services)
	for i := 0; i < t.services; i++ {
		var bs []service.Backend
		for _, a := range t.backends(i) {
			bs = append(bs, service.Backend{Addr: a, Port: backendPort})
		}
		st[service.Frontend{Addr: vipOf(i), Port: vipPort, Proto: service.TCP}] = bs
	}
	return st
}

// frames is a pool of pre-built frames of frameLen bytes, back to back.
type frames struct {
	buf []byte
	n   int
}

func (f *frames) add(fr packet.Frame) {
	b := fr.Build()
	if len(b) != frameLen {
		panic(fmt.Sprintf("frame of %d bytes, want %d", len(b), frameLen))
	}
	f.buf = append(f.buf, b...)
	f.n++
}

func (f *frames) at(i int) []byte { return f.buf[i*frameLen : (i+1)*frameLen] }

func (f *frames) slice(from, to int) frames {
	return frames{buf: f.buf[from*frameLen : to*frameLen], n: to - from}
}

var (
	podMAC  = [6]byte{2, 0, 0, 0, 0, 1}
	hostMAC = [6]byte{2, 0, 0, 0, 0, 2}
)

func tcpFrame(src netip.Addr, sport uint16, dst netip.Addr, dport uint16, flags uint8) packet.Frame {
	return packet.Frame{SrcMAC: podMAC, DstMAC: hostMAC, Src: src, Dst: dst, Proto: tcpProto,
		SrcPort: sport, DstPort: dport, TCPFlags: flags, Seq: 1000, Ack: 2000}
}

// flow is a client socket talking to a Service (svc >= 0) or to a remote address.
type flow struct {
	client netip.Addr
	port   uint16
	svc    int
	remote netip.Addr
}

// traffic is what one number of Services sends, shared by the v1 and v2 datapaths of that
// size so both see the very same frames.
type traffic struct {
	services int
	est      []flow // established service flows, random VIPs
	fresh    []flow // new service flows: rounds x newFlows, never seen before
	nonSvc   []flow // established non-service flows
	estFwd   frames // client -> VIP, ACK
	freshFwd frames // client -> VIP, SYN
	nsFwd    frames // pod -> remote, ACK
	nsRep    frames // remote -> pod, ACK
}

func newTraffic(p params, services int, rng *mrand.Rand) *traffic {
	used := map[uint64]bool{}
	socket := func() (netip.Addr, uint16) {
		for {
			c := rng.IntN(clientPods)
			port := uint16(clientPortMin + rng.IntN(clientPortMax-clientPortMin+1))
			if k := uint64(c)<<16 | uint64(port); !used[k] {
				used[k] = true
				return netip.AddrFrom4([4]byte{10, 128, 0, byte(c)}), port
			}
		}
	}
	tr := &traffic{services: services}
	for i := 0; i < p.flows; i++ {
		c, port := socket()
		f := flow{client: c, port: port, svc: rng.IntN(services)}
		tr.est = append(tr.est, f)
		tr.estFwd.add(tcpFrame(c, port, vipOf(f.svc), vipPort, packet.ACK))
	}
	for i := 0; i < p.rounds*p.newFlows; i++ {
		c, port := socket()
		f := flow{client: c, port: port, svc: rng.IntN(services)}
		tr.fresh = append(tr.fresh, f)
		tr.freshFwd.add(tcpFrame(c, port, vipOf(f.svc), vipPort, packet.SYN))
	}
	for i := 0; i < p.nonSvc; i++ {
		c, port := socket()
		r := rng.IntN(1 << 16)
		f := flow{client: c, port: port, svc: -1, remote: netip.AddrFrom4([4]byte{10, 200, byte(r >> 8), byte(r)})}
		tr.nonSvc = append(tr.nonSvc, f)
		tr.nsFwd.add(tcpFrame(c, port, f.remote, remotePort, packet.ACK))
		tr.nsRep.add(tcpFrame(f.remote, remotePort, c, port, packet.ACK))
	}
	return tr
}

// subject is one datapath under test: a version, a number of Services, a fan-out.
type subject struct {
	version  string // "v1" or "v2"
	topo     topology
	tr       *traffic
	from, to *ebpf.Program
	maps     []*ebpf.Map
	ct       *ebpf.Map // conntrack, for tests that check the flows are what they claim
	close    func()
	seed     time.Duration // writing the Services into the maps
	// Per established flow, learnt when the flow was opened: its backend, and the reply
	// as it comes back on the wire (backend -> client).
	backend []netip.Addr
	replies frames
}

func (s *subject) String() string {
	return fmt.Sprintf("%s, %d Services, %d frontends per backend", s.version, s.topo.services, s.topo.fanout)
}

func pinRoot() string {
	var b [6]byte
	rand.Read(b[:])
	return filepath.Join("/sys/fs/bpf", "tern-bench-"+hex.EncodeToString(b[:]))
}

// ctEntries is how many conntrack entries a datapath must hold so that nothing is evicted
// during the run: per service flow two in v2 (FLOW and SVC halves), one in v1; non-service
// flows one in v2, none in v1; a quarter more for hash-map slack.
func ctEntries(p params, version string) uint32 {
	svcFlows := p.flows + p.rounds*p.newFlows
	n := 2*svcFlows + p.nonSvc
	if version == "v1" {
		n = svcFlows
	}
	return uint32(n + n/4 + 64)
}

func loadV2Subject(p params, topo topology, tr *traffic) (*subject, error) {
	root := pinRoot()
	dp, err := loader.Load(loader.Config{PinRoot: root, MaxFlows: ctEntries(p, "v2"), Forwarding: p.forwarding})
	if err != nil {
		loader.RemovePins(root)
		return nil, fmt.Errorf("load v2 datapath: %w", err)
	}
	s := &subject{version: "v2", topo: topo, tr: tr, from: dp.FromPod(), to: dp.ToPod(),
		close: func() { dp.Close(); loader.RemovePins(root) }}
	m := dp.Maps()
	s.maps = []*ebpf.Map{m.Services, m.Backends, m.Members, m.CT, m.Metrics}
	s.ct = m.CT
	r, err := lbmap.NewReconciler(m, nil)
	if err != nil {
		s.close()
		return nil, fmt.Errorf("v2 service reconciler: %w", err)
	}
	start := time.Now()
	if err := r.Sync(topo.desired()); err != nil {
		s.close()
		return nil, fmt.Errorf("seed %d Services into v2 maps: %w", topo.services, err)
	}
	s.seed = time.Since(start)
	return s, nil
}

func loadV1Subject(p params, topo topology, tr *traffic) (*subject, error) {
	coll, err := loadV1(p.v1Object, ctEntries(p, "v1"))
	if err != nil {
		return nil, err
	}
	s := &subject{version: "v1", topo: topo, tr: tr, from: coll.Programs["tern_from_pod"],
		to: coll.Programs["tern_to_pod"], ct: coll.Maps["tern_ct"], close: func() { coll.Close() }}
	for _, m := range coll.Maps {
		s.maps = append(s.maps, m)
	}
	start := time.Now()
	if err := seedV1(coll, topo); err != nil {
		s.close()
		return nil, err
	}
	s.seed = time.Since(start)
	return s, nil
}

// mapBytes is the kernel memory of the subject's maps (their memlock in fdinfo).
func (s *subject) mapBytes() uint64 {
	var total uint64
	for _, m := range s.maps {
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

// Offsets into a frameLen frame.
const (
	offSrc   = packet.EthLen + 12
	offDst   = packet.EthLen + 16
	offSport = packet.EthLen + 20
	offDport = packet.EthLen + 22
)

func addrAt(b []byte, off int) netip.Addr { return netip.AddrFrom4([4]byte(b[off : off+4])) }
func portAt(b []byte, off int) uint16     { return binary.BigEndian.Uint16(b[off:]) }

func describe(b []byte) string {
	pp, err := packet.Parse(b)
	if err != nil {
		return fmt.Sprintf("unparsable (%v)", err)
	}
	return fmt.Sprintf("%s:%d -> %s:%d flags %#x, checksums ok %v", pp.Src, pp.SrcPort, pp.Dst, pp.DstPort, pp.TCPFlags, pp.ChecksumsOK())
}

// open establishes the subject's flows the way real traffic does: the client's SYN
// through from-pod (the datapath picks the backend), the backend's SYN-ACK through to-pod,
// so every conntrack entry is in the established state; and one packet of every
// non-service flow. It checks every translation on the way, records each flow's backend
// and builds its reply frame from the translated tuple as it went on the wire.
func (s *subject) open(ctx context.Context) error {
	out := make([]byte, 256)
	for i, f := range s.tr.est {
		if i%4096 == 0 && ctx.Err() != nil {
			return ctx.Err()
		}
		syn := tcpFrame(f.client, f.port, vipOf(f.svc), vipPort, packet.SYN).Build()
		v, o, _, err := progrun.Run(s.from, syn, out)
		if err != nil {
			return err
		}
		be := addrAt(o, offDst)
		if v != tcActOK || !slices.Contains(s.topo.backends(f.svc), be) || portAt(o, offDport) != backendPort ||
			addrAt(o, offSrc) != f.client {
			return fmt.Errorf("%s: SYN %s came out as verdict %d, %s; want a backend of Service %d (%v) on port %d",
				s, describe(syn), v, describe(o), f.svc, s.topo.backends(f.svc), backendPort)
		}
		wirePort := portAt(o, offSport)
		synack := tcpFrame(be, backendPort, f.client, wirePort, packet.SYN|packet.ACK).Build()
		v, o, _, err = progrun.Run(s.to, synack, out)
		if err != nil {
			return err
		}
		if err := checkReply(v, o, f); err != nil {
			return fmt.Errorf("%s: SYN-ACK %s: %w", s, describe(synack), err)
		}
		s.backend = append(s.backend, be)
		s.replies.add(tcpFrame(be, backendPort, f.client, wirePort, packet.ACK))
	}
	for i := 0; i < s.tr.nsFwd.n; i++ {
		in := s.tr.nsFwd.at(i)
		v, o, _, err := progrun.Run(s.from, in, out)
		if err != nil {
			return err
		}
		if v != tcActOK || !bytes.Equal(o, in) {
			return fmt.Errorf("%s: non-service %s came out changed: verdict %d, %s", s, describe(in), v, describe(o))
		}
	}
	return nil
}

// checkReply: a reply must leave to-pod as VIP:80 -> the client's own address and port.
func checkReply(v uint32, o []byte, f flow) error {
	if v != tcActOK || addrAt(o, offSrc) != vipOf(f.svc) || portAt(o, offSport) != vipPort ||
		addrAt(o, offDst) != f.client || portAt(o, offDport) != f.port {
		return fmt.Errorf("came out as verdict %d, %s; want %s:%d -> %s:%d",
			v, describe(o), vipOf(f.svc), vipPort, f.client, f.port)
	}
	return nil
}

// kind is what a scenario measures.
type kind int

const (
	kindNoop kind = iota
	kindFwdEst
	kindRepEst
	kindNew
	kindNSFwd
	kindNSRep
)

func (k kind) String() string {
	return [...]string{"no-op tc program", "from pod: established", "to pod: reply, established",
		"from pod: new flow (SYN)", "from pod: non-service", "to pod: non-service reply"}[k]
}

// scenario is one (subject, kind): a pool of frames run once each per round, every
// output checked.
type scenario struct {
	s      *subject // nil for the no-op program
	kind   kind
	prog   *ebpf.Program
	frames func(round int) frames
	check  func(i int, v uint32, in, out []byte) error
	ns     []float64 // mean kernel ns per run, one per round
	runs   int       // checked runs in total
}

func (sc *scenario) String() string {
	if sc.s == nil {
		return sc.kind.String()
	}
	return fmt.Sprintf("%s [%s]", sc.kind, sc.s)
}

func unchanged(_ int, v uint32, in, out []byte) error {
	if v != tcActOK || !bytes.Equal(in, out) {
		return fmt.Errorf("came out as verdict %d, %s; want it untouched", v, describe(out))
	}
	return nil
}

func scenarios(s *subject, newFlows int) []*scenario {
	tr := s.tr
	out := []*scenario{
		{s: s, kind: kindFwdEst, prog: s.from, frames: func(int) frames { return tr.estFwd },
			check: func(i int, v uint32, in, o []byte) error {
				f := tr.est[i]
				if v != tcActOK || addrAt(o, offDst) != s.backend[i] || portAt(o, offDport) != backendPort ||
					addrAt(o, offSrc) != f.client {
					return fmt.Errorf("came out as verdict %d, %s; want -> %s:%d, the flow's backend", v, describe(o), s.backend[i], backendPort)
				}
				return nil
			}},
		{s: s, kind: kindRepEst, prog: s.to, frames: func(int) frames { return s.replies },
			check: func(i int, v uint32, in, o []byte) error { return checkReply(v, o, tr.est[i]) }},
	}
	if s.topo.fanout > 1 {
		return out
	}
	return append(out,
		&scenario{s: s, kind: kindNew, prog: s.from,
			frames: func(r int) frames { return tr.freshFwd.slice(r*newFlows, (r+1)*newFlows) },
			check: func(i int, v uint32, in, o []byte) error {
				f := tr.fresh[i]
				if v != tcActOK || !slices.Contains(s.topo.backends(f.svc), addrAt(o, offDst)) || portAt(o, offDport) != backendPort {
					return fmt.Errorf("came out as verdict %d, %s; want a backend of %v", v, describe(o), s.topo.backends(f.svc))
				}
				return nil
			}},
		&scenario{s: s, kind: kindNSFwd, prog: s.from, frames: func(int) frames { return tr.nsFwd }, check: unchanged},
		&scenario{s: s, kind: kindNSRep, prog: s.to, frames: func(int) frames { return tr.nsRep }, check: unchanged},
	)
}

// pass runs every frame of the round once and returns the mean kernel-reported ns per run.
func (sc *scenario) pass(ctx context.Context, round int, out []byte) (float64, error) {
	fr := sc.frames(round)
	base := 0
	if sc.kind == kindNew {
		base = round * fr.n
	}
	var total uint64
	for i := 0; i < fr.n; i++ {
		if i%4096 == 0 && ctx.Err() != nil {
			return 0, ctx.Err()
		}
		in := fr.at(i)
		v, o, ns, err := progrun.Run(sc.prog, in, out)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", sc, err)
		}
		if sc.check != nil {
			if err := sc.check(base+i, v, in, o); err != nil {
				return 0, fmt.Errorf("%s, round %d, frame %d (%s): %w", sc, round, i, describe(in), err)
			}
		}
		total += uint64(ns)
		sc.runs++
	}
	return float64(total) / float64(fr.n), nil
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 0 {
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return s[len(s)/2]
}

// bench is a whole run: the traffic, the subjects, the scenarios and their results.
type bench struct {
	p         params
	noop      *scenario
	subjects  []*subject
	scenarios []*scenario
	closers   []func()
	elapsed   time.Duration
}

func (b *bench) Close() {
	for _, c := range slices.Backward(b.closers) {
		c()
	}
}

// setup generates the traffic, loads and seeds every subject and opens its flows. The
// caller must Close the bench, also after an error.
func setup(ctx context.Context, p params, noop *ebpf.Program) (*bench, error) {
	b := &bench{p: p}
	rng := mrand.New(mrand.NewPCG(p.seed, p.seed^0x7465726e))
	var noopFrames frames
	var perSubject [][]*scenario
	for _, n := range p.sizes {
		tr := newTraffic(p, n, rng)
		if noopFrames.n == 0 {
			noopFrames = tr.estFwd
		}
		fanouts := [][2]int{{1, 1}}
		if n >= p.fanout {
			fanouts = append(fanouts, [2]int{p.v1Fanout, p.fanout})
		}
		for _, fo := range fanouts {
			for _, version := range []string{"v1", "v2"} {
				topo := topology{services: n, fanout: fo[0]}
				load := loadV1Subject
				if version == "v2" {
					topo.fanout = fo[1]
					load = loadV2Subject
				}
				s, err := load(p, topo, tr)
				if err != nil {
					return b, err
				}
				b.closers = append(b.closers, s.close)
				b.subjects = append(b.subjects, s)
				if err := s.open(ctx); err != nil {
					return b, err
				}
				perSubject = append(perSubject, scenarios(s, p.newFlows))
			}
		}
	}
	b.noop = &scenario{kind: kindNoop, prog: noop, frames: func(int) frames { return noopFrames },
		check: func(_ int, v uint32, _, _ []byte) error {
			if v != tcActOK {
				return fmt.Errorf("verdict %d", v)
			}
			return nil
		}}
	// Kind-major order: the passes of one datapath are never adjacent, so a pass does not
	// find its flows' entries still cached from that datapath's previous pass.
	b.scenarios = []*scenario{b.noop}
	for k := kindFwdEst; k <= kindNSRep; k++ {
		for _, scs := range perSubject {
			for _, sc := range scs {
				if sc.kind == k {
					b.scenarios = append(b.scenarios, sc)
				}
			}
		}
	}
	return b, nil
}

// measure runs the rounds: every scenario once per round, the order rotated each round so
// no scenario always runs first or last.
func (b *bench) measure(ctx context.Context) error {
	out := make([]byte, 256)
	start := time.Now()
	for r := 0; r < b.p.rounds; r++ {
		for i := range b.scenarios {
			sc := b.scenarios[(i+r)%len(b.scenarios)]
			ns, err := sc.pass(ctx, r, out)
			if err != nil {
				return err
			}
			sc.ns = append(sc.ns, ns)
		}
	}
	b.elapsed = time.Since(start)
	return nil
}

// find returns the scenario of kind k for version at n Services and the given fan-out
// (1, or the shared-backend rows), or nil.
func (b *bench) find(version string, n int, shared bool, k kind) *scenario {
	for _, sc := range b.scenarios {
		if sc.s != nil && sc.s.version == version && sc.s.topo.services == n &&
			(sc.s.topo.fanout > 1) == shared && sc.kind == k {
			return sc
		}
	}
	return nil
}
