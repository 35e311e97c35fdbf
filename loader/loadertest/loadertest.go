// Package loadertest loads the datapath for tests, with pins under a directory of the
// test's own that is removed when the test ends, and seeds maps the way the service
// reconciler would.
package loadertest

import (
	"crypto/rand"
	"encoding/hex"
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
)

// New loads the pod programs with a private pin root.
func New(tb testing.TB, cfg loader.Config) *loader.Datapath {
	tb.Helper()
	testutil.RequirePrivileged(tb)
	if cfg.PinRoot == "" {
		cfg.PinRoot = PinRoot(tb)
	}
	d, err := loader.Load(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close() })
	return d
}

// PinRoot returns a fresh bpffs directory that is removed (with everything pinned in it)
// when the test ends.
func PinRoot(tb testing.TB) string {
	tb.Helper()
	var b [6]byte
	rand.Read(b[:])
	root := filepath.Join("/sys/fs/bpf", "tern-test-"+hex.EncodeToString(b[:]))
	tb.Cleanup(func() {
		if err := loader.RemovePins(root); err != nil {
			tb.Error(err)
		}
	})
	return root
}

// Backend is an address and port for PutService.
type Backend struct {
	Addr string
	Port uint16
}

// PutService writes a frontend and its backends directly (membership, slots, frontend),
// for datapath tests that do not need the reconciler.
func PutService(tb testing.TB, m *loader.Maps, id uint32, vip string, port uint16, proto uint8, backends ...Backend) {
	tb.Helper()
	for i, be := range backends {
		k := loader.BackendKey{SvcId: id, Slot: uint32(i + 1)}
		v := loader.BackendValue{Addr: loader.AddrToBE(netip.MustParseAddr(be.Addr)), Port: loader.PortToBE(be.Port)}
		if err := m.Backends.Put(k, v); err != nil {
			tb.Fatal(err)
		}
		mk := loader.MemberKey{SvcId: id, Addr: v.Addr, Port: v.Port}
		if err := m.Members.Put(mk, uint32(i+1)); err != nil {
			tb.Fatal(err)
		}
	}
	k := loader.ServiceKey{Addr: loader.AddrToBE(netip.MustParseAddr(vip)), Port: loader.PortToBE(port), Proto: proto}
	if err := m.Services.Put(k, loader.ServiceValue{Id: id, BackendCount: uint16(len(backends))}); err != nil {
		tb.Fatal(err)
	}
}

// Run executes prog once on frame with BPF_PROG_TEST_RUN and returns the verdict and the
// packet as the program left it.
func Run(tb testing.TB, prog *ebpf.Program, frame []byte) (uint32, []byte) {
	tb.Helper()
	opts := &ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+256)}
	ret, err := prog.Run(opts)
	if err != nil {
		tb.Fatalf("test run: %v", err)
	}
	return ret, opts.DataOut
}

// Metric returns the packets counted under reason and direction.
func Metric(tb testing.TB, m *loader.Maps, r loader.Reason, dir loader.Direction) uint64 {
	tb.Helper()
	tot, err := m.MetricsTotals()
	if err != nil {
		tb.Fatal(err)
	}
	return tot[loader.MetricsKey{Reason: r, Dir: dir}].Packets
}

// B is shorthand for a Backend.
func B(addr string, port uint16) Backend { return Backend{Addr: addr, Port: port} }
