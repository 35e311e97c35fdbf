package loader

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/internal/testutil"
)

// Maps shared between objects are declared once: every map the netdev object pins is one
// the pod object declares with the same definition, so loading it after the pod object
// reuses the pin instead of failing on (or moving aside) a map of another shape.
func TestNetdevMapsAreThePodObjects(t *testing.T) {
	pod, err := LoadPod()
	if err != nil {
		t.Fatal(err)
	}
	nd, err := LoadNetdev()
	if err != nil {
		t.Fatal(err)
	}
	for name, ms := range nd.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		ps, ok := pod.Maps[name]
		if !ok {
			t.Errorf("netdev object pins %s, which the pod object does not declare", name)
			continue
		}
		if ps.Type != ms.Type || ps.KeySize != ms.KeySize || ps.ValueSize != ms.ValueSize ||
			ps.MaxEntries != ms.MaxEntries || ps.Flags != ms.Flags || ps.Pinning != ms.Pinning {
			t.Errorf("%s differs between the objects: pod %v, netdev %v", name, ps, ms)
		}
	}
}

func testPinRoot(t *testing.T) string {
	var b [6]byte
	rand.Read(b[:])
	root := filepath.Join("/sys/fs/bpf", "tern-test-"+hex.EncodeToString(b[:]))
	t.Cleanup(func() {
		if err := RemovePins(root); err != nil {
			t.Error(err)
		}
	})
	return root
}

// TestMetricsGrowMovesOldPinAside: a node whose tern_metrics was pinned by the layout with
// three directions (96 entries) loads this one (384: from-netdev, to-netdev and sock came later, and reasons outgrew 32): Load moves the old pin aside instead
// of refusing, the pod and netdev programs share the one new map, and FinishUpgrade
// removes the old pin.
func TestMetricsGrowMovesOldPinAside(t *testing.T) {
	testutil.RequirePrivileged(t)
	root := testPinRoot(t)
	if err := os.MkdirAll(root, 0o700); err != nil {
		t.Fatal(err)
	}
	old, err := ebpf.NewMapWithOptions(&ebpf.MapSpec{Name: PodMapTernMetrics, Type: ebpf.PerCPUArray,
		KeySize: 4, ValueSize: 16, MaxEntries: 96, Pinning: ebpf.PinByName}, ebpf.MapOptions{PinPath: root})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	d, err := Load(Config{PinRoot: root})
	if err != nil {
		t.Fatalf("load over a 96-entry tern_metrics: %v", err)
	}
	defer d.Close()
	if n := d.objs.TernMetrics.MaxEntries(); n != 384 {
		t.Fatalf("pod object's tern_metrics has %d entries, want 384", n)
	}
	podInfo, err := d.objs.TernMetrics.Info()
	if err != nil {
		t.Fatal(err)
	}
	ndInfo, err := d.netdev.TernMetrics.Info()
	if err != nil {
		t.Fatal(err)
	}
	podID, _ := podInfo.ID()
	ndID, _ := ndInfo.ID()
	if podID != ndID {
		t.Fatalf("pod and netdev objects use different tern_metrics maps (ids %d, %d): counters would split", podID, ndID)
	}
	pinned, err := ebpf.LoadPinnedMap(filepath.Join(root, PodMapTernMetrics), nil)
	if err != nil {
		t.Fatal(err)
	}
	pinnedInfo, err := pinned.Info()
	pinned.Close()
	if err != nil {
		t.Fatal(err)
	}
	if id, _ := pinnedInfo.ID(); id != podID {
		t.Fatalf("pinned tern_metrics is map %d, the programs use %d", id, podID)
	}
	asides, _ := filepath.Glob(filepath.Join(root, PodMapTernMetrics+"_old_*"))
	if len(asides) != 1 {
		t.Fatalf("want the old tern_metrics moved aside once, found %v", asides)
	}
	if err := d.FinishUpgrade(); err != nil {
		t.Fatal(err)
	}
	if asides, _ := filepath.Glob(filepath.Join(root, PodMapTernMetrics+"_old_*")); len(asides) != 0 {
		t.Fatalf("FinishUpgrade left %v", asides)
	}
}
