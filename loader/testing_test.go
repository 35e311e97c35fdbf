package loader

import (
	"crypto/rand"
	"encoding/hex"
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/internal/testutil"
)

// newTestDatapath loads the pod programs with pins under a fresh directory of its own, and
// removes them when the test ends.
func newTestDatapath(tb testing.TB, cfg Config) *Datapath {
	tb.Helper()
	testutil.RequirePrivileged(tb)
	var b [6]byte
	rand.Read(b[:])
	cfg.PinRoot = filepath.Join("/sys/fs/bpf", "tern-test-"+hex.EncodeToString(b[:]))
	d, err := Load(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		d.Close()
		if err := RemovePins(cfg.PinRoot); err != nil {
			tb.Error(err)
		}
	})
	return d
}

type backend struct {
	addr string
	port uint16
}

// putService writes a frontend and its backends the way the reconciler does: slots, then
// the frontend, plus the reverse-NAT index.
func putService(tb testing.TB, m *Maps, id uint32, vip string, port uint16, proto uint8, backends ...backend) {
	tb.Helper()
	for i, be := range backends {
		k := BackendKey{SvcId: id, Slot: uint32(i + 1)}
		v := BackendValue{Addr: AddrToBE(netip.MustParseAddr(be.addr)), Port: PortToBE(be.port)}
		if err := m.Backends.Put(k, v); err != nil {
			tb.Fatal(err)
		}
		rk := RevNATKey{Addr: v.Addr, Port: v.Port, Proto: proto}
		var rv RevNATValue
		if err := m.RevNAT.Lookup(rk, &rv); err != nil && !IsNotExist(err) {
			tb.Fatal(err)
		}
		rv.Frontends[rv.Count] = RevNATFrontend{Addr: AddrToBE(netip.MustParseAddr(vip)), Port: PortToBE(port)}
		rv.Count++
		if err := m.RevNAT.Put(rk, rv); err != nil {
			tb.Fatal(err)
		}
	}
	k := ServiceKey{Addr: AddrToBE(netip.MustParseAddr(vip)), Port: PortToBE(port), Proto: proto}
	if err := m.Services.Put(k, ServiceValue{Id: id, BackendCount: uint16(len(backends))}); err != nil {
		tb.Fatal(err)
	}
}

// run executes prog once on frame with BPF_PROG_TEST_RUN and returns the verdict and the
// packet as the program left it.
func run(tb testing.TB, prog *ebpf.Program, frame []byte) (uint32, []byte) {
	tb.Helper()
	opts := &ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+256)}
	ret, err := prog.Run(opts)
	if err != nil {
		tb.Fatalf("test run: %v", err)
	}
	return ret, opts.DataOut
}

func metric(tb testing.TB, m *Maps, r Reason, dir Direction) uint64 {
	tb.Helper()
	tot, err := m.MetricsTotals()
	if err != nil {
		tb.Fatal(err)
	}
	return tot[MetricsKey{Reason: r, Dir: dir}].Packets
}
