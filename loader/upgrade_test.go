package loader_test

import (
	"bytes"
	_ "embed"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// v1Object is embedded so that the test binary carries it into the qemu kernels' initramfs.
//
//go:embed testdata/v1/pod_bpfel.o
var v1Object []byte

// v1 conntrack entry, as bpf/lib/conntrack.h of the first layout (loader/testdata/v1)
// defines it.
type v1Key struct {
	Saddr, Daddr uint32
	Sport, Dport uint16
	Proto        uint8
	Pad          [3]uint8
}

type v1Value struct {
	ExpiresNs   uint64
	BackendAddr uint32
	BackendPort uint16
	Flags       uint16
	SvcID       uint32
	Pad         uint32
}

// newV1CT pins an empty first-layout tern_ct under root, made from the kept v1 object.
func newV1CT(t *testing.T, root string) *ebpf.Map {
	t.Helper()
	spec, err := ebpf.LoadCollectionSpecFromReader(bytes.NewReader(v1Object))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.NewMapWithOptions(spec.Maps["tern_ct"], ebpf.MapOptions{PinPath: root})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// TestV1ConntrackConversionMatchesDatapath: for each kind of service flow, the entries Load
// converts from a first-layout tern_ct entry are byte for byte the entries the new
// programs write themselves (svc_open, and svc_merge once a reply was seen) for the same
// flow. A wrong canonical order, flag or field would send replies astray after an upgrade.
func TestV1ConntrackConversionMatchesDatapath(t *testing.T) {
	backendLow := netip.MustParseAddr("10.0.0.5") // below the client: the backend is side a
	flows := []struct {
		name      string
		proto     uint8
		sport     uint16
		vport     uint16
		be        netip.Addr
		bport     uint16
		svcID     uint32
		reply     bool
		v1Flags   uint16
		closeFlow bool
	}{
		{name: "tcp syn", proto: packet.ProtoTCP, sport: 40000, vport: 80, be: be1, bport: 8080, svcID: 1},
		{name: "tcp established", proto: packet.ProtoTCP, sport: 40002, vport: 80, be: be1, bport: 8080, svcID: 1,
			reply: true, v1Flags: loader.CTFlagSeenReply},
		{name: "udp backend is side a", proto: packet.ProtoUDP, sport: 40001, vport: 53, be: backendLow, bport: 5353, svcID: 2},
		{name: "tcp hairpin", proto: packet.ProtoTCP, sport: 40003, vport: 81, be: client, bport: 8080, svcID: 3,
			v1Flags: loader.CTFlagHairpin},
	}

	// What the new programs write.
	d := loadertest.New(t, loader.Config{})
	loadertest.PutService(t, d.Maps(), 1, vip.String(), 80, packet.ProtoTCP, loadertest.B(be1.String(), 8080))
	loadertest.PutService(t, d.Maps(), 2, vip.String(), 53, packet.ProtoUDP, loadertest.B(backendLow.String(), 5353))
	loadertest.PutService(t, d.Maps(), 3, vip.String(), 81, packet.ProtoTCP, loadertest.B(client.String(), 8080))
	for _, f := range flows {
		fr := tcp(client, f.sport, vip, f.vport, packet.SYN)
		if f.proto == packet.ProtoUDP {
			fr = udp(client, f.sport, vip, f.vport, "q")
		}
		if v, _ := loadertest.Run(t, d.FromPod(), fr.Build()); v != verdictOK && v != verdictRedirect {
			t.Fatalf("%s: from-pod verdict %d", f.name, v)
		}
		if f.reply {
			if v, _ := loadertest.Run(t, d.ToPod(), tcp(f.be, f.bport, client, f.sport, packet.SYN|packet.ACK).Build()); v != verdictOK {
				t.Fatalf("%s: to-pod verdict %d", f.name, v)
			}
		}
	}
	want, err := d.Maps().DumpCT()
	if err != nil {
		t.Fatal(err)
	}
	if len(want) != 2*len(flows) {
		t.Fatalf("the datapath wrote %d conntrack entries for %d service flows, want two each: %+v", len(want), len(flows), want)
	}

	// The same flows as the first layout held them, with the deadlines the datapath chose.
	root := loadertest.PinRoot(t)
	old := newV1CT(t, root)
	for _, f := range flows {
		sk := loader.CTFlowKey(client, f.sport, vip, f.vport, f.proto)
		sv, ok := want[sk]
		if !ok || sv.Flags&loader.CTFlagSvc == 0 {
			t.Fatalf("%s: the datapath wrote no SVC entry %+v", f.name, sk)
		}
		k := v1Key{Saddr: loader.AddrToBE(client), Daddr: loader.AddrToBE(vip), Sport: loader.PortToBE(f.sport),
			Dport: loader.PortToBE(f.vport), Proto: f.proto}
		v := v1Value{ExpiresNs: sv.ExpiresNs, BackendAddr: loader.AddrToBE(f.be), BackendPort: loader.PortToBE(f.bport),
			Flags: f.v1Flags, SvcID: f.svcID}
		if err := old.Put(k, v); err != nil {
			t.Fatal(err)
		}
	}
	// An expired first-layout flow is not carried over.
	if err := old.Put(v1Key{Saddr: loader.AddrToBE(client), Daddr: loader.AddrToBE(vip), Sport: loader.PortToBE(49999),
		Dport: loader.PortToBE(80), Proto: packet.ProtoTCP},
		v1Value{ExpiresNs: 1, BackendAddr: loader.AddrToBE(be1), BackendPort: loader.PortToBE(8080), SvcID: 1}); err != nil {
		t.Fatal(err)
	}

	d2 := loadertest.New(t, loader.Config{PinRoot: root})
	got, err := d2.Maps().DumpCT()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("converted entries differ from the datapath's own")
		for k, w := range want {
			if g, ok := got[k]; !ok || g != w {
				t.Errorf("key %+v: converted %+v (present %v), datapath %+v", k, g, ok, w)
			}
		}
		for k, g := range got {
			if _, ok := want[k]; !ok {
				t.Errorf("extra converted key %+v = %+v", k, g)
			}
		}
	}
	if st := d2.LastMigration(); st.Converted != len(flows) || st.Expired != 1 {
		t.Errorf("migration stats %+v, want %d converted and 1 expired", st, len(flows))
	}

	if _, err := os.Stat(filepath.Join(root, "tern_ct")); err != nil {
		t.Fatalf("first-layout pin gone before FinishUpgrade: %v", err)
	}
	if err := d2.FinishUpgrade(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "tern_ct")); !os.IsNotExist(err) {
		t.Fatalf("first-layout pin still there after FinishUpgrade: %v", err)
	}
}

// TestIncompatiblePinnedMapMovedAside: a pinned map whose size changed is moved aside, not
// refused; its entries are copied into the new one and the old pin goes at FinishUpgrade.
func TestIncompatiblePinnedMapMovedAside(t *testing.T) {
	root := loadertest.PinRoot(t)
	d1 := loadertest.New(t, loader.Config{PinRoot: root, MaxServices: 1024})
	loadertest.PutService(t, d1.Maps(), 7, vip.String(), 80, packet.ProtoTCP, loadertest.B(be1.String(), 8080))
	d1.Close()

	d2 := loadertest.New(t, loader.Config{PinRoot: root, MaxServices: 2048})
	if mi, err := d2.Maps().Services.Info(); err != nil || mi.MaxEntries != 2048 {
		t.Fatalf("service map after the size change: %+v, %v; want 2048 entries", mi, err)
	}
	svcs, err := d2.Maps().DumpServices()
	if err != nil {
		t.Fatal(err)
	}
	k := loader.ServiceKey{Addr: loader.AddrToBE(vip), Port: loader.PortToBE(80), Proto: packet.ProtoTCP}
	if v, ok := svcs[k]; !ok || v.Id != 7 || v.BackendCount != 1 {
		t.Fatalf("service entry not carried into the resized map: %+v", svcs)
	}
	aside := oldPins(t, root)
	if len(aside) != 1 || !strings.HasPrefix(aside[0], "tern_services_old_") {
		t.Fatalf("moved-aside pins %v, want one tern_services_old_*", aside)
	}
	if err := d2.FinishUpgrade(); err != nil {
		t.Fatal(err)
	}
	if aside := oldPins(t, root); len(aside) != 0 {
		t.Fatalf("moved-aside pins left after FinishUpgrade: %v", aside)
	}
}

func oldPins(t *testing.T, root string) []string {
	t.Helper()
	es, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		if strings.Contains(e.Name(), "_old_") {
			out = append(out, e.Name())
		}
	}
	return out
}
