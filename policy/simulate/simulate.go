// Package simulate decides NetworkPolicy connectivity offline with the real compiler
// (package policy) and the real pod programs, run with BPF_PROG_TEST_RUN over maps of
// their own (loader.LoadPrivate): no agent, no cluster, nothing pinned or attached.
//
// A probe from A to B runs two packets, as a real connection's first packet would meet
// them: tern_from_pod as A's endpoint (A's egress, after service translation when B is a
// ClusterIP — not modelled yet), then tern_to_pod as B's endpoint (B's ingress). An end
// that is not a pod runs no program of its own and its side's verdict is true. Both runs
// use the interface the program serves in a test run (ifindex 1), whose endpoint entry is
// rewritten per run; the policy maps, the ipcache and conntrack are the same for every
// probe of a run, and each probe uses its own source port so probes never share a flow.
package simulate

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policymap"
)

// The context of a test run: struct __sk_buff (UAPI, 192 bytes) with ingress_ifindex at
// offset 36. to-pod packets say they came from another interface: 0 means the node's own
// stack, which policy always allows.
const (
	skbCtxSize           = 192
	skbIngressIfindexOff = 36
	fromElsewhere        = 5
	programIfindex       = 1 // what a test run's skb->ifindex is: the loopback device
	tcActShot            = 2
)

// Simulator holds a private datapath; Run may be called many times.
type Simulator struct {
	dp     *loader.Datapath
	writer *policymap.Writer
	ipc    map[netip.Addr]bool // tern_ipcache entries written by the last Run
}

// New loads the pod programs with private maps (needs CAP_BPF or root).
func New() (*Simulator, error) {
	dp, err := loader.LoadPrivate()
	if err != nil {
		return nil, err
	}
	w, err := policymap.NewWriter(dp.PolicyMaps())
	if err != nil {
		dp.Close()
		return nil, err
	}
	return &Simulator{dp: dp, writer: w, ipc: map[netip.Addr]bool{}}, nil
}

// Close releases the programs and maps.
func (s *Simulator) Close() error { return s.dp.Close() }

type end struct {
	name string
	addr netip.Addr
	pod  *corev1.Pod
}

func resolve(st *policy.State, byIP map[netip.Addr]*corev1.Pod, s string) (end, error) {
	if ns, name, ok := strings.Cut(s, "/"); ok {
		for i := range st.Pods {
			p := &st.Pods[i]
			if p.Namespace == ns && p.Name == name {
				a, _ := netip.ParseAddr(p.Status.PodIP)
				return end{name: s, addr: a, pod: p}, nil
			}
		}
		return end{}, fmt.Errorf("no pod %q in namespace %q in the state", name, ns)
	}
	a, err := netip.ParseAddr(s)
	if err != nil || !a.Is4() {
		return end{}, fmt.Errorf("%q is neither NS/POD nor an IPv4 address", s)
	}
	return end{name: s, addr: a, pod: byIP[a]}, nil
}

// Run compiles st, loads it into the private maps and decides every probe.
func (s *Simulator) Run(st policy.State, probes []Probe) ([]Result, error) {
	desired, err := policy.Compile(st)
	if err != nil {
		return nil, err
	}
	if err := s.load(desired); err != nil {
		return nil, err
	}
	byIP := map[netip.Addr]*corev1.Pod{}
	for i := range st.Pods {
		for _, a := range policy.PodAddrs(&st.Pods[i]) {
			byIP[a] = &st.Pods[i]
		}
	}
	var errs []error
	out := make([]Result, 0, len(probes))
	for i, pr := range probes {
		src, err := resolve(&st, byIP, pr.From)
		if err != nil {
			errs = append(errs, fmt.Errorf("probe %d from: %w", i, err))
			continue
		}
		dst, err := resolve(&st, byIP, pr.To)
		if err != nil {
			errs = append(errs, fmt.Errorf("probe %d to: %w", i, err))
			continue
		}
		if src.pod == nil && dst.pod == nil {
			errs = append(errs, fmt.Errorf("probe %d: neither %q nor %q is a pod: NetworkPolicy has nothing to decide", i, pr.From, pr.To))
			continue
		}
		res := Result{From: pr.From, To: pr.To, Port: pr.Port, Protocol: pr.Protocol, Egress: true, Ingress: true}
		frame := probeFrame(src.addr, dst.addr, sourcePort(i), uint16(pr.Port), probeProto(pr.Protocol))
		if src.pod != nil {
			if res.Egress, err = s.runAs(desired, src, s.dp.FromPod(), frame, 0); err != nil {
				return nil, fmt.Errorf("probe %d: %w", i, err)
			}
		}
		if dst.pod != nil {
			if res.Ingress, err = s.runAs(desired, dst, s.dp.ToPod(), frame, fromElsewhere); err != nil {
				return nil, fmt.Errorf("probe %d: %w", i, err)
			}
		}
		res.Allowed = res.Egress && res.Ingress
		out = append(out, res)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}

// sourcePort gives each probe of a run its own flow.
func sourcePort(i int) uint16 { return uint16(10000 + i%50000) }

// probeProto is a probe's IP protocol number (ICMP is not a NetworkPolicy protocol).
func probeProto(p string) uint8 {
	if p == "ICMP" {
		return packet.ProtoICMP
	}
	return policy.ProtoNumber(corev1.Protocol(p))
}

// probeFrame is a connection's first packet: a TCP SYN, a UDP or SCTP datagram, or an ICMP
// echo request (type 8).
func probeFrame(src, dst netip.Addr, sport, dport uint16, proto uint8) []byte {
	f := packet.Frame{SrcMAC: [6]byte{2, 0, 0, 0, 0, 1}, DstMAC: [6]byte{2, 0, 0, 0, 0, 2}, Src: src, Dst: dst,
		Proto: proto, SrcPort: sport, DstPort: dport, ID: 1}
	if proto == packet.ProtoICMP {
		f.SrcPort, f.DstPort, f.ICMPType = 0, 0, 8
	}
	if proto == packet.ProtoTCP {
		f.TCPFlags = packet.SYN
		f.Seq = 1
	}
	return f.Build()
}

// runAs runs prog once as the endpoint of e and tells whether it let the packet through.
func (s *Simulator) runAs(d *policy.Desired, e end, prog *ebpf.Program, frame []byte, ingress byte) (bool, error) {
	v := loader.EndpointValue{Addr: loader.AddrToBE(e.addr), Flags: loader.EndpointFlagPolicy,
		Identity: uint32(d.PodIdentity[podKey(e.pod)])}
	if err := s.dp.Maps().PutEndpoint(loader.EndpointKey{Ifindex: programIfindex}, v); err != nil {
		return false, fmt.Errorf("write the endpoint of %s: %w", e.name, err)
	}
	ctx := make([]byte, skbCtxSize)
	ctx[skbIngressIfindexOff] = ingress
	opts := &ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+256), Context: ctx}
	ret, err := prog.Run(opts)
	if err != nil {
		return false, fmt.Errorf("run %s as %s: %w", prog, e.name, err)
	}
	return ret != tcActShot, nil
}

// load writes the compiled maps, the ipcache, and empties conntrack.
func (s *Simulator) load(d *policy.Desired) error {
	if _, err := s.writer.Sync(policymap.Encode(d, policymap.Options{})); err != nil {
		return err
	}
	m := s.dp.Maps()
	want := policymap.IPCache(d)
	for a := range s.ipc {
		if _, ok := want[a]; !ok {
			if err := m.DeleteIPCache(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(a)}); err != nil && !loader.IsNotExist(err) {
				return fmt.Errorf("delete ipcache %s: %w", a, err)
			}
			delete(s.ipc, a)
		}
	}
	for a, v := range want {
		if err := m.PutIPCache(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(a)}, v); err != nil {
			return fmt.Errorf("write ipcache %s: %w", a, err)
		}
		s.ipc[a] = true
	}
	var keys []loader.CTKey
	var (
		k loader.CTKey
		v loader.CTValue
	)
	it := m.CT.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read conntrack: %w", err)
	}
	for _, k := range keys {
		if err := m.CT.Delete(k); err != nil && !loader.IsNotExist(err) {
			return fmt.Errorf("empty conntrack: %w", err)
		}
	}
	return nil
}

func podKey(p *corev1.Pod) types.NamespacedName {
	return types.NamespacedName{Namespace: p.Namespace, Name: p.Name}
}
