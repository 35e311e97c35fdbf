package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// What a throughput run did to the links it crossed, and (with -perf) where the CPU time
// went. The link counters answer "were the segments carried as large GSO/GRO packets or
// cut into MTU-sized ones on the way": a veth counts a GSO packet once, so bytes per packet
// near 1,500 on a hop means segmentation there, tens of kilobytes means it was kept whole.

// linkDelta is how much one link counted during a run.
type linkDelta struct {
	RxPackets uint64 `json:"rxPackets"`
	RxBytes   uint64 `json:"rxBytes"`
	TxPackets uint64 `json:"txPackets"`
	TxBytes   uint64 `json:"txBytes"`
}

// watchedLink is a link the probe reads: a name in a namespace, under a label.
type watchedLink struct {
	label string
	ns    netns.NsHandle
	name  string
}

type streamProbe struct {
	links  map[string]linkDelta
	before map[string]linkDelta
	watch  []watchedLink
	perf   *exec.Cmd
	logf   func(string, ...any)
}

// startProbe snapshots the counters of the client's link and node-1's primary NIC (the
// NodePort hop) and, with -perf, starts a system-wide profile named after the run.
func (b *bench) startProbe(name string) (*streamProbe, error) {
	p := &streamProbe{links: map[string]linkDelta{}, logf: b.logf}
	if b.ext != nil {
		p.watch = append(p.watch, watchedLink{"external client eth0", b.ext.NS(), "eth0"})
	}
	if b.routed != nil {
		p.watch = append(p.watch, watchedLink{"routed client ext0", b.routed.NS, "ext0"})
	}
	p.watch = append(p.watch, watchedLink{"node-1 eth0", b.l.Node(nodeTern).NS, "eth0"})
	var err error
	if p.before, err = p.read(); err != nil {
		return nil, err
	}
	if b.p.perfDir != "" {
		if err := os.MkdirAll(b.p.perfDir, 0o755); err != nil {
			return nil, err
		}
		out := filepath.Join(b.p.perfDir, name+".data")
		p.perf = exec.Command("perf", "record", "-q", "-e", "cpu-clock", "-a", "-g", "-o", out)
		p.perf.Stderr = os.Stderr
		if err := p.perf.Start(); err != nil {
			return nil, fmt.Errorf("start perf (needed by -perf): %w", err)
		}
		// perf opens its events before it profiles: give it a moment so the run is covered.
		time.Sleep(300 * time.Millisecond)
	}
	return p, nil
}

func (p *streamProbe) read() (map[string]linkDelta, error) {
	out := map[string]linkDelta{}
	for _, w := range p.watch {
		h, err := netlink.NewHandleAt(w.ns)
		if err != nil {
			return nil, fmt.Errorf("netlink in %s's namespace: %w", w.label, err)
		}
		l, err := h.LinkByName(w.name)
		h.Close()
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", w.label, err)
		}
		st := l.Attrs().Statistics
		out[w.label] = linkDelta{RxPackets: st.RxPackets, RxBytes: st.RxBytes, TxPackets: st.TxPackets, TxBytes: st.TxBytes}
	}
	return out, nil
}

// stop ends the profile and records the link counters' deltas.
func (p *streamProbe) stop() error {
	var perr error
	if p.perf != nil {
		_ = p.perf.Process.Signal(syscall.SIGINT)
		// perf writes its file on SIGINT and may then report the signal as its exit.
		if err := p.perf.Wait(); err != nil {
			if ee, ok := errors.AsType[*exec.ExitError](err); !ok || !ee.Sys().(syscall.WaitStatus).Signaled() {
				perr = fmt.Errorf("perf record: %w", err)
			}
		}
	}
	after, err := p.read()
	if err != nil {
		return err
	}
	for k, a := range after {
		b := p.before[k]
		d := linkDelta{RxPackets: a.RxPackets - b.RxPackets, RxBytes: a.RxBytes - b.RxBytes,
			TxPackets: a.TxPackets - b.TxPackets, TxBytes: a.TxBytes - b.TxBytes}
		p.links[k] = d
		p.logf("  %s: rx %d packets, %.0f bytes/packet; tx %d packets, %.0f bytes/packet", k,
			d.RxPackets, perPacket(d.RxBytes, d.RxPackets), d.TxPackets, perPacket(d.TxBytes, d.TxPackets))
	}
	return perr
}

func perPacket(bytes, packets uint64) float64 {
	if packets == 0 {
		return 0
	}
	return float64(bytes) / float64(packets)
}
