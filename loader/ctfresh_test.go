package loader_test

import (
	"fmt"
	"net/netip"
	"runtime"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// handshakeLoad drives new TCP service flows through a small conntrack table from one
// goroutine per CPU (each pinned to its CPU, as softirqs of different CPUs are), the way a
// client that connects, reads and closes in a loop does: each flow's SYN goes out, and the
// backend's SYN-ACK comes back only after inFlight newer flows have opened (handshakes in
// flight on that CPU); then the flow is used and closed. A few long-lived flows are touched
// in between, so the table holds referenced entries as a busy node's does. It returns the
// SYN-ACKs that came back untranslated (their REVNAT half was gone) and the flows run.
func handshakeLoad(t *testing.T, h *ctHarness, cpus, perCPU, inFlight int) (lost, flows int) {
	t.Helper()
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		errs []error
	)
	for w := 0; w < cpus; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			var set unix.CPUSet
			set.Set(w)
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				mu.Lock()
				errs = append(errs, fmt.Errorf("pin to CPU %d: %w", w, err))
				mu.Unlock()
				return
			}
			cl := netip.AddrFrom4([4]byte{10, 0, 1, byte(100 + w)})
			run := func(prog string, f packet.Frame) (packet.Parsed, error) {
				p := h.d.FromPod()
				if prog == "to" {
					p = h.d.ToPod()
				}
				v, out, err := runOnce(p, f.Build())
				if err != nil {
					return packet.Parsed{}, err
				}
				if v != verdictOK {
					return packet.Parsed{}, fmt.Errorf("%s-pod %s:%d -> %s:%d: verdict %d", prog, f.Src, f.SrcPort, f.Dst, f.DstPort, v)
				}
				return packet.Parse(out)
			}
			backend := map[uint16]netip.Addr{}
			const warm = 10
			n := 0
			for i := 0; i < perCPU+inFlight; i++ {
				if i < perCPU {
					port := uint16(10000 + i)
					out, err := run("from", tcp(cl, port, vip, 80, packet.SYN))
					if err != nil {
						mu.Lock()
						errs = append(errs, err)
						mu.Unlock()
						return
					}
					backend[port] = out.Dst
				}
				if j := i - inFlight; j >= 0 {
					port := uint16(10000 + j)
					be := backend[port]
					delete(backend, port)
					in, err := run("to", tcp(be, 8080, cl, port, packet.SYN|packet.ACK))
					if err != nil {
						mu.Lock()
						errs = append(errs, err)
						mu.Unlock()
						return
					}
					n++
					if in.Src != vip {
						mu.Lock()
						lost++
						mu.Unlock()
						continue
					}
					// The rest of a short connection: ACK, a greeting, the client's FIN.
					run("from", tcp(cl, port, vip, 80, packet.ACK))
					run("to", tcp(be, 8080, cl, port, packet.ACK|packet.PSH))
					run("from", tcp(cl, port, vip, 80, packet.FIN|packet.ACK))
					run("to", tcp(be, 8080, cl, port, packet.FIN|packet.ACK))
				}
				// One long-lived flow in turn: a client segment and its reply.
				wp := uint16(5000 + i%warm)
				if out, err := run("from", tcp(cl, wp, vip, 80, packet.ACK)); err == nil {
					run("to", tcp(out.Dst, 8080, cl, wp, packet.ACK))
				}
			}
			mu.Lock()
			flows += n
			mu.Unlock()
		}()
	}
	wg.Wait()
	for _, err := range errs {
		t.Error(err)
	}
	return lost, flows
}

// runOnce is loadertest.Run for goroutines other than the test's: it returns errors.
func runOnce(p *ebpf.Program, frame []byte) (uint32, []byte, error) {
	opts := &ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+256)}
	ret, err := p.Run(opts)
	return ret, opts.DataOut, err
}

// Fresh service flows keep both halves until their handshake completes, in a table kept
// full: the kernel's LRU recycles unreferenced entries first, and a just-created pair was
// unreferenced (its CPU's pending inserts, flushed to the head of the inactive list and
// shrunk from there when that list was short), so a 1,024-entry table lost the REVNAT half
// of a share of new flows before their SYN-ACK. ct_create marks them referenced.
func TestFreshServiceFlowsSurviveAFullTable(t *testing.T) {
	for _, inFlight := range []int{0, 1, 4, 16, 64} {
		t.Run(fmt.Sprintf("%d in flight per CPU", inFlight), func(t *testing.T) {
			h := newCT(t, loader.Config{MaxFlows: 1024})
			loadertest.PutService(t, h.m, 1, vip.String(), 80, packet.ProtoTCP,
				loadertest.B(be1.String(), 8080), loadertest.B(be2.String(), 8080))
			lost, flows := handshakeLoad(t, h, 2, 6000, inFlight)
			t.Logf("%d of %d SYN-ACKs found no REVNAT half (%.2f%%)", lost, flows, 100*float64(lost)/float64(flows))
			// Measured on 6.18 (2 CPUs): created unreferenced, 1.1-2.3 % were lost with 1 to
			// 4 in flight; referenced, 0 to 0.01 %. With more in flight the approximation
			// of the kernel's LRU still loses some (16: ~0.1 %, 64: 8-9 %): logged only.
			if inFlight <= 4 && lost*1000 > flows {
				t.Errorf("%d of %d new flows lost their REVNAT half before the SYN-ACK with %d in flight per CPU, want at most 0.1 %%", lost, flows, inFlight)
			}
		})
	}
}

// A local backend's SYN-ACK whose flow lost its entries is counted where it leaves the
// backend (from-pod): forwarded into a client pod on the same node with bpf_redirect_peer,
// it never crosses the client's to-pod hook, which counts the loss otherwise.
func TestHandshakeReplyLostCountedFromALocalBackend(t *testing.T) {
	h := newCT(t, loader.Config{})
	loadertest.PutService(t, h.m, 1, vip.String(), 80, packet.ProtoTCP, loadertest.B(be1.String(), 8080))
	h.forward(tcp(client, 3000, vip, 80, packet.SYN))
	if err := h.m.CT.Delete(loader.CTFlowKey(client, 3000, be1, 8080, packet.ProtoTCP)); err != nil {
		t.Fatal(err)
	}
	lost := loadertest.Metric(t, h.m, loader.ReasonCTReplyLost, loader.DirFromPod)
	out := h.forward(tcp(be1, 8080, client, 3000, packet.SYN|packet.ACK))
	wantAddrPort(t, "the backend's SYN-ACK with its flow's entries gone (passed as it is)", out.Src, out.SrcPort, be1, 8080)
	if got := loadertest.Metric(t, h.m, loader.ReasonCTReplyLost, loader.DirFromPod) - lost; got != 1 {
		t.Errorf("ct_reply_lost (from-pod) counted %d for the backend's untracked SYN-ACK, want 1", got)
	}
	// Its flow's own SYN-ACK, translated: not counted.
	h.forward(tcp(client, 3001, vip, 80, packet.SYN))
	lost = loadertest.Metric(t, h.m, loader.ReasonCTReplyLost, loader.DirFromPod)
	h.forward(tcp(be1, 8080, client, 3001, packet.SYN|packet.ACK))
	if got := loadertest.Metric(t, h.m, loader.ReasonCTReplyLost, loader.DirFromPod) - lost; got != 0 {
		t.Errorf("ct_reply_lost (from-pod) counted %d for a SYN-ACK whose flow is tracked, want 0", got)
	}
}
