package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/ternctl"
	"github.com/tern-net/tern/ternctl/ternctltest"
)

// TestMonitorShowsADropWithinASecond: a pod sends a frame whose IPv4 header lies about its
// length; tern_from_pod drops it (drop_bad_ip) and `ternctl monitor --pod --reason -o json`
// prints the drop, with the pod's addresses and ports, within a second of the send.
func TestMonitorShowsADropWithinASecond(t *testing.T) {
	lab := newNodeLab(t)
	pod := lab.addPod("client", "10.0.1.10")
	lab.addPod("other", "10.0.1.20")
	d := loadertest.New(t, loader.Config{})
	lab.attachAll(d)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "none.sock")
	lines, done := ternctltest.StartMonitor(t, func(stdout, stderr io.Writer) int {
		// The monitor reads the node's ring buffer; it runs in the node namespace to name
		// the interface.
		var code int
		_ = nsutil.Do(lab.node, func() error {
			code = ternctl.Main(ctx, []string{"--pin-root", d.Config().PinRoot, "--socket", sock,
				"monitor", "--pod", "10.0.1.10", "--reason", "drop_bad_ip", "--count", "1", "-o", "json"}, stdout, stderr)
			return nil
		})
		return code
	})

	// The frame leaves the pod's eth0 through a packet socket: the pod's own stack would
	// not send a header this broken.
	sent := time.Now()
	if err := nsutil.Do(pod.ns, func() error { return sendBadIP(lab, pod) }); err != nil {
		t.Fatal(err)
	}
	select {
	case line, ok := <-lines:
		if !ok {
			t.Fatalf("monitor printed nothing (exit %d)", <-done)
		}
		took := time.Since(sent)
		var ev ternctl.DropEvent
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("monitor line %q: %v", line, err)
		}
		if ev.Type != "drop" || ev.Reason != "drop_bad_ip" || ev.Direction != "from-pod" || ev.Proto != "UDP" ||
			ev.Source.String() != "10.0.1.10:5555" || ev.Destination.String() != "10.0.1.20:7777" ||
			ev.IfIndex != uint32(pod.ifindex) || ev.Interface != pod.hostIf {
			t.Errorf("event %+v; want drop_bad_ip from-pod UDP 10.0.1.10:5555 -> 10.0.1.20:7777 on %s (%d)", ev, pod.hostIf, pod.ifindex)
		}
		if took > time.Second {
			t.Errorf("the drop took %s to show, want under a second", took)
		}
		t.Logf("drop shown %s after the send: %s", took, line)
	case <-time.After(time.Second):
		t.Fatal("no drop shown within a second of the send")
	}
	if code := <-done; code != 0 {
		t.Errorf("monitor --count 1 exited %d", code)
	}
	if n := loadertest.Metric(t, d.Maps(), loader.ReasonDropBadIP, loader.DirFromPod); n != 1 {
		t.Errorf("drop_bad_ip from-pod counted %d, want 1", n)
	}
}

// sendBadIP sends one UDP-looking frame from the pod's eth0 whose IPv4 total length (10) is
// shorter than its header.
func sendBadIP(lab *nodeLab, pod *podNS) error {
	eth0, err := netlink.LinkByName("eth0")
	if err != nil {
		return err
	}
	var hostMAC net.HardwareAddr
	if err := nsutil.Do(lab.node, func() error {
		l, err := netlink.LinkByIndex(pod.ifindex)
		if err == nil {
			hostMAC = l.Attrs().HardwareAddr
		}
		return err
	}); err != nil {
		return err
	}
	return testutil.SendShortIPv4(eth0.Attrs().Index, eth0.Attrs().HardwareAddr, hostMAC, [4]byte{10, 0, 1, 10}, [4]byte{10, 0, 1, 20})
}
