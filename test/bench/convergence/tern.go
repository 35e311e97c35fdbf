package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/tern-net/tern/test/bench/procmem"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/service"
)

type ternResult struct {
	// coldStart is process start to the end of the first full sync into empty maps
	// (datapath load, informer LIST, builder, batch map load); coldSync is that sync's
	// own duration as the controller logs it.
	coldStart, coldSync time.Duration
	// warmSync is the full sync after a restart over maps that already hold everything:
	// the same work as the periodic resync (re-read the maps, compare every frontend).
	warmStart, warmSync time.Duration
	frontends           int
	rss, peak           uint64
	lat                 stats
}

// fullSyncLine is the part of the controller's "full sync" log line we read.
type fullSyncLine struct {
	Msg       string  `json:"msg"`
	Services  int     `json:"services"`
	Frontends int     `json:"frontends"`
	Took      float64 `json:"took"` // zap's production encoder writes durations in seconds
	Error     string  `json:"error"`
}

// ternRun is one ternsvc process.
type ternRun struct {
	proc  *child
	start time.Time
	syncs chan fullSyncLine
}

func startTernsvc(e *env, root, logName string) (*ternRun, error) {
	r := &ternRun{syncs: make(chan fullSyncLine, 16)}
	cmd := exec.Command(e.ternsvc, "-kubeconfig", e.cp.KubeconfigPath(), "-pin-root", root, "-keep-pins")
	r.start = time.Now()
	p, err := startChild(e.root, "ternsvc", cmd, filepath.Join(e.logDir, logName), func(_ time.Time, line string) {
		var l fullSyncLine
		if json.Unmarshal([]byte(line), &l) == nil && l.Msg == "full sync" {
			select {
			case r.syncs <- l:
			default: // nobody waits for later resyncs
			}
		}
	})
	if err != nil {
		return nil, err
	}
	r.proc = p
	return r, nil
}

// waitFullSync returns the first full sync's log line and when it arrived.
func (r *ternRun) waitFullSync(ctx context.Context, timeout time.Duration) (fullSyncLine, time.Duration, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		select {
		case l := <-r.syncs:
			if l.Error != "" {
				return l, 0, fmt.Errorf("ternsvc full sync failed: %s", l.Error)
			}
			return l, time.Since(r.start), nil
		case <-r.proc.exited:
			return fullSyncLine{}, 0, r.proc.exitedErr()
		case <-timer.C:
			return fullSyncLine{}, 0, fmt.Errorf("ternsvc logged no full sync within %s (see its log)", timeout)
		case <-ctx.Done():
			return fullSyncLine{}, 0, ctx.Err()
		}
	}
}

func newPinRoot() string {
	var b [6]byte
	rand.Read(b[:])
	return filepath.Join("/sys/fs/bpf", "tern-convbench-"+hex.EncodeToString(b[:]))
}

func runTern(ctx context.Context, e *env, size int) (res *ternResult, retErr error) {
	root := newPinRoot()
	defer func() {
		if err := loader.RemovePins(root); err != nil {
			retErr = errors.Join(retErr, fmt.Errorf("remove pins %s: %w", root, err))
		}
	}()
	res = &ternResult{}

	run, err := startTernsvc(e, root, fmt.Sprintf("ternsvc-%d.log", size))
	if err != nil {
		return nil, err
	}
	defer run.proc.stop(10 * time.Second)
	l, took, err := run.waitFullSync(ctx, 5*time.Minute)
	if err != nil {
		return nil, err
	}
	res.coldStart, res.coldSync, res.frontends = took, secs(l.Took), l.Frontends
	if l.Services < size {
		return nil, fmt.Errorf("ternsvc's first full sync saw %d Services, want at least %d", l.Services, size)
	}

	obs, err := newMapObserver(root)
	if err != nil {
		return nil, err
	}
	if n, err := obs.count(); err != nil || n < size {
		obs.close()
		return nil, fmt.Errorf("service map holds %d frontends after the full sync, want at least %d (err %v)", n, size, err)
	}
	e.logf("tern, %d Services: cold full sync %s; measuring %d changes", size, res.coldSync, e.cfg.changes)
	chs, err := measure(ctx, e.cl, obs, e.cfg.changes, e.cfg.rate, e.cfg.drain)
	if err != nil {
		return nil, err
	}
	res.lat = summarize(chs)
	if res.rss, res.peak, err = procmem.Read(run.proc.pid()); err != nil {
		return nil, err
	}
	run.proc.stop(10 * time.Second)

	// Restart over the populated maps: the reconciler starts from what is pinned and the
	// full sync compares every frontend without writing (the periodic resync's work).
	warm, err := startTernsvc(e, root, fmt.Sprintf("ternsvc-%d-restart.log", size))
	if err != nil {
		return nil, err
	}
	defer warm.proc.stop(10 * time.Second)
	l, took, err = warm.waitFullSync(ctx, 5*time.Minute)
	if err != nil {
		return nil, fmt.Errorf("restart over populated maps: %w", err)
	}
	res.warmStart, res.warmSync = took, secs(l.Took)
	return res, nil
}

func secs(f float64) time.Duration { return time.Duration(f * float64(time.Second)) }

// mapObserver polls the pinned LB maps every millisecond for the changes it expects:
// a lookup of the frontend, then of its slots, until one holds the new address.
type mapObserver struct {
	svcs, backends *ebpf.Map
	mu             sync.Mutex
	waiting        []*change
	stop, done     chan struct{}
}

func newMapObserver(root string) (*mapObserver, error) {
	svcs, err := ebpf.LoadPinnedMap(filepath.Join(root, loader.PodMapTernServices), nil)
	if err != nil {
		return nil, fmt.Errorf("open pinned service map under %s: %w", root, err)
	}
	bes, err := ebpf.LoadPinnedMap(filepath.Join(root, loader.PodMapTernBackends), nil)
	if err != nil {
		svcs.Close()
		return nil, fmt.Errorf("open pinned backend map under %s: %w", root, err)
	}
	o := &mapObserver{svcs: svcs, backends: bes, stop: make(chan struct{}), done: make(chan struct{})}
	go o.poll()
	return o, nil
}

func (o *mapObserver) count() (int, error) {
	var (
		k loader.ServiceKey
		v loader.ServiceValue
		n int
	)
	it := o.svcs.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

func (o *mapObserver) poll() {
	defer close(o.done)
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-o.stop:
			return
		case <-tick.C:
		}
		o.mu.Lock()
		now := time.Now()
		o.waiting = slices.DeleteFunc(o.waiting, func(ch *change) bool {
			if !o.holds(ch) {
				return false
			}
			ch.seen = now
			return true
		})
		o.mu.Unlock()
	}
}

func (o *mapObserver) holds(ch *change) bool {
	f := service.Frontend{Addr: ch.vip, Port: servicePort, Proto: service.TCP}
	var v loader.ServiceValue
	k := loader.ServiceKey{Addr: loader.AddrToBE(f.Addr), Port: loader.PortToBE(f.Port), Proto: uint8(f.Proto)}
	if o.svcs.Lookup(k, &v) != nil {
		return false
	}
	for slot := uint32(1); slot <= uint32(v.BackendCount); slot++ {
		var b loader.BackendValue
		if o.backends.Lookup(loader.BackendKey{SvcId: v.Id, Slot: slot}, &b) == nil && loader.BEToAddr(b.Addr) == ch.addr {
			return true
		}
	}
	return false
}

func (o *mapObserver) expect(ch *change) {
	o.mu.Lock()
	o.waiting = append(o.waiting, ch)
	o.mu.Unlock()
}

func (o *mapObserver) forget(ch *change) {
	o.mu.Lock()
	o.waiting = slices.DeleteFunc(o.waiting, func(c *change) bool { return c == ch })
	o.mu.Unlock()
}

func (o *mapObserver) pending() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.waiting)
}

func (o *mapObserver) close() {
	select {
	case <-o.stop:
		return
	default:
	}
	close(o.stop)
	<-o.done
	o.svcs.Close()
	o.backends.Close()
}
