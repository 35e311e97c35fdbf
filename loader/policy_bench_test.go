package loader_test

import (
	"fmt"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policymap"
)

// BenchmarkPolicyStage measures the pod programs per packet (BPF_PROG_TEST_RUN with
// Repeat, so the kernel's own loop, no syscall per packet) with NetworkPolicy off, on a flow
// whose verdict is cached in conntrack, and on a denied flow (never cached: every packet
// pays the whole lookup — the worst case, as a new flow's first packet does) with 100 and
// 10,000 rules on the endpoint. Both directions. Run:
//
//	TERN_PRIVILEGED=1 go test ./loader -run XXX -bench PolicyStage -benchtime 3x
func BenchmarkPolicyStage(b *testing.B) {
	const subject = policy.Identity(5000)
	self := netip.MustParseAddr("10.0.0.1")
	denied := netip.MustParseAddr("10.1.0.1")  // a pod whose identity no rule names
	allowed := netip.MustParseAddr("10.1.0.2") // a pod the rules allow on TCP 80
	for _, rules := range []int{0, 100, 10000} {
		d := loadertest.New(b, loader.Config{})
		m, pm := d.Maps(), d.PolicyMaps()
		if err := m.PutEndpoint(loader.EndpointKey{Ifindex: 1}, loader.EndpointValue{Addr: loader.AddrToBE(self),
			Flags: loader.EndpointFlagPolicy, Identity: uint32(subject)}); err != nil {
			b.Fatal(err)
		}
		if rules > 0 {
			if err := pm.Isolation.Put(uint32(subject), loader.PolicyIsoValue{Flags: policy.IsolatedIngress | policy.IsolatedEgress}); err != nil {
				b.Fatal(err)
			}
		}
		for i := range rules {
			for _, dir := range []policy.Direction{policy.Ingress, policy.Egress} {
				k := policymap.RuleKey(policy.RuleKey{Subject: subject, Peer: policy.Identity(10000 + i), Dir: dir, Proto: 6, Port: 80, PortBits: 16})
				if err := pm.Rules.Put(k, loader.PolicyValue{}); err != nil {
					b.Fatal(err)
				}
			}
		}
		for a, id := range map[netip.Addr]uint32{denied: 99999, allowed: 10000} {
			if err := m.PutIPCache(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(a)},
				loader.IPCacheValue{Identity: id, Flags: loader.IPCacheFlagPod}); err != nil {
				b.Fatal(err)
			}
		}
		cases := []struct {
			name string
			peer netip.Addr
		}{{"denied", denied}, {"cached", allowed}}
		if rules == 0 {
			cases = cases[:1]
			cases[0].name = "not-isolated"
		}
		for _, c := range cases {
			for i, dirName := range []string{"to-pod", "from-pod"} {
				sport := uint16(40000 + i)
				prog, frame := d.ToPod(), tcp(c.peer, sport, self, 80, packet.ACK).Build()
				if dirName == "from-pod" {
					prog, frame = d.FromPod(), tcp(self, sport, c.peer, 80, packet.ACK).Build()
				}
				b.Run(fmt.Sprintf("%s/%s/rules=%d", dirName, c.name, rules), func(b *testing.B) {
					b.ReportMetric(benchRun(b, prog, frame), "ns/pkt")
				})
			}
		}
	}
}

// benchRun returns the CPU time per packet of test runs with Repeat: one syscall per
// 100,000 packets, so the syscall is noise, and the calling thread's CPU time rather than
// wall time, so that other work on a shared machine is not counted. (Program.Benchmark
// takes no context, and the to-pod direction needs ingress_ifindex set, or the packet
// counts as the node's own.)
func benchRun(b *testing.B, prog *ebpf.Program, frame []byte) float64 {
	ctx := make([]byte, skbCtxSize)
	ctx[skbIngressIfindexOff] = remote
	const repeat = 100000
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var total time.Duration
	for b.Loop() {
		opts := &ebpf.RunOptions{Data: frame, Repeat: repeat, Context: ctx}
		start := threadCPU(b)
		if _, err := prog.Run(opts); err != nil {
			b.Fatal(err)
		}
		total += threadCPU(b) - start
	}
	return float64(total.Nanoseconds()) / float64(b.N) / repeat
}

func threadCPU(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
