package loader_test

// Service features on the pod path, run through the real from-pod program with
// BPF_PROG_TEST_RUN, with the maps written by the real reconciler (service/lbmap):
// sessionAffinity ClientIP, Maglev selection, and internalTrafficPolicy Local's drop.

import (
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/lbmap"
)

// featureRig is one datapath with a reconciler that programs a single TCP frontend.
type featureRig struct {
	t    *testing.T
	d    *loader.Datapath
	m    *loader.Maps
	r    *lbmap.Reconciler
	fe   service.Frontend
	opts service.Options
}

func newFeatureRig(t *testing.T, o service.Options, backends ...service.Backend) *featureRig {
	d := loadertest.New(t, loader.Config{})
	r, err := lbmap.NewReconciler(d.Maps(), nil)
	if err != nil {
		t.Fatal(err)
	}
	fr := &featureRig{t: t, d: d, m: d.Maps(), r: r, fe: service.Frontend{Addr: vip, Port: 80, Proto: service.TCP}, opts: o}
	fr.set(backends...)
	return fr
}

func (fr *featureRig) set(backends ...service.Backend) {
	fr.t.Helper()
	st := service.State{fr.fe: backends}
	o := fr.opts
	if o.MaglevSize != 0 {
		o.MaglevSize = service.MaglevSize(len(backends), 0)
	}
	if err := fr.r.ApplyWith(st.Lookup, func(service.Frontend) service.Options { return o }, []service.Frontend{fr.fe}); err != nil {
		fr.t.Fatal(err)
	}
}

// syn sends a new connection's SYN and returns the backend it was translated to.
func (fr *featureRig) syn(src netip.Addr, sport uint16) netip.Addr {
	fr.t.Helper()
	v, out := loadertest.Run(fr.t, fr.d.FromPod(), tcp(src, sport, vip, 80, packet.SYN).Build())
	if v != verdictOK {
		fr.t.Fatalf("SYN from %s:%d: verdict %d, want TC_ACT_OK", src, sport, v)
	}
	return parse(fr.t, out).Dst
}

// forgetFlows empties conntrack, so the next packet of any tuple opens a new flow and asks
// the selection again (instead of following its established flow).
func (fr *featureRig) forgetFlows() {
	fr.t.Helper()
	ct, err := fr.m.DumpCT()
	if err != nil {
		fr.t.Fatal(err)
	}
	for k := range ct {
		if err := fr.m.CT.Delete(k); err != nil {
			fr.t.Fatal(err)
		}
	}
}

func backendsN(n int) []service.Backend {
	out := make([]service.Backend, n)
	for i := range out {
		out[i] = service.Backend{Addr: netip.AddrFrom4([4]byte{10, 0, 2, byte(21 + i)}), Port: 8080}
	}
	return out
}

func coarseNow(t *testing.T) uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC_COARSE, &ts); err != nil {
		t.Fatal(err)
	}
	return uint64(ts.Nano())
}

func clientN(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 0, 1, byte(10 + i)}) }

func TestAffinitySameClientSameBackend(t *testing.T) {
	for _, c := range []struct {
		name     string
		affinity uint32
	}{{"ClientIP", service.DefaultAffinitySeconds}, {"None", 0}} {
		t.Run(c.name, func(t *testing.T) {
			fr := newFeatureRig(t, service.Options{AffinitySeconds: c.affinity}, backendsN(4)...)
			perClient := map[netip.Addr]map[netip.Addr]int{}
			firsts := map[netip.Addr]bool{}
			for i := range 16 {
				cl := clientN(i)
				perClient[cl] = map[netip.Addr]int{}
				for port := uint16(40000); port < 40030; port++ {
					perClient[cl][fr.syn(cl, port)]++
				}
				for b := range perClient[cl] {
					firsts[b] = true
				}
			}
			for cl, got := range perClient {
				if c.affinity != 0 && len(got) != 1 {
					t.Fatalf("client %s's 30 connections went to %v, want one backend", cl, got)
				}
				// Without affinity, 30 random picks among 4 all landing on one backend has
				// probability 4^-29: the control that shows the assertion above can fail.
				if c.affinity == 0 && len(got) == 1 {
					t.Fatalf("without affinity, client %s's 30 connections all went to %v", cl, got)
				}
			}
			if len(firsts) < 2 {
				t.Fatalf("16 clients all stuck to %v: affinity must be per client, not per Service", firsts)
			}
			aff, err := fr.m.DumpAffinity()
			if err != nil {
				t.Fatal(err)
			}
			if want := map[bool]int{true: 16, false: 0}[c.affinity != 0]; len(aff) != want {
				t.Fatalf("affinity map holds %d entries, want %d", len(aff), want)
			}
		})
	}
}

// An entry older than the timeout is ignored (and replaced); a fresh one is followed.
func TestAffinityTimeout(t *testing.T) {
	const timeout = 30
	fr := newFeatureRig(t, service.Options{AffinitySeconds: timeout}, backendsN(4)...)
	cl := clientN(0)
	fr.syn(cl, 40000)
	aff, err := fr.m.DumpAffinity()
	if err != nil || len(aff) != 1 {
		t.Fatalf("affinity map after one flow: %v (%v), want one entry", aff, err)
	}
	var key loader.AffinityKey
	var val loader.AffinityValue
	for k, v := range aff {
		key, val = k, v
	}
	target := loader.BEToAddr(val.Addr)
	for _, c := range []struct {
		name      string
		age       time.Duration
		wantStuck bool
		ports     uint16 // new tuples per case: a reused one would follow its open flow
	}{{"fresh", (timeout - 5) * time.Second, true, 41000}, {"expired", (timeout + 1) * time.Second, false, 42000}} {
		t.Run(c.name, func(t *testing.T) {
			onTarget := 0
			const flows = 40
			for i := range flows {
				stamp := val
				stamp.LastNs = coarseNow(t) - uint64(c.age)
				if err := fr.m.Affinity.Put(key, stamp); err != nil {
					t.Fatal(err)
				}
				before := coarseNow(t)
				if fr.syn(cl, c.ports+uint16(i)) == target {
					onTarget++
				}
				var after loader.AffinityValue
				if err := fr.m.Affinity.Lookup(key, &after); err != nil {
					t.Fatal(err)
				}
				// Every new flow restamps the entry, as kube-proxy's "recent" match does.
				if after.LastNs < before-uint64(10*time.Millisecond) {
					t.Fatalf("flow %d left the entry stamped %d ns before the flow", i, before-after.LastNs)
				}
			}
			if c.wantStuck && onTarget != flows {
				t.Fatalf("%d of %d flows followed a %s-old entry, want all", onTarget, flows, c.age)
			}
			// Random among 4: all 40 on the old backend has probability 4^-40.
			if !c.wantStuck && onTarget == flows {
				t.Fatalf("all %d flows followed an entry older than the %d s timeout", flows, timeout)
			}
		})
	}
}

// A backend that left the Service is never chosen by affinity; the client moves to a live one
// and sticks to it.
func TestAffinitySkipsRemovedBackend(t *testing.T) {
	bs := backendsN(3)
	fr := newFeatureRig(t, service.Options{AffinitySeconds: service.DefaultAffinitySeconds}, bs...)
	cl := clientN(0)
	first := fr.syn(cl, 40000)
	var rest []service.Backend
	for _, b := range bs {
		if b.Addr != first {
			rest = append(rest, b)
		}
	}
	fr.set(rest...)
	second := fr.syn(cl, 40001)
	if second == first {
		t.Fatalf("new flow went to removed backend %s through affinity", first)
	}
	for port := uint16(40002); port < 40030; port++ {
		if got := fr.syn(cl, port); got != second {
			t.Fatalf("after the move the client went to %s, then %s: want it to stick", second, got)
		}
	}
}

// maglevPrediction reads the frontend's table back from the kernel and says which backend
// the table sends a tuple to.
func maglevPrediction(t *testing.T, fr *featureRig) func(src netip.Addr, sport uint16) netip.Addr {
	svcs, err := fr.m.DumpServices()
	if err != nil {
		t.Fatal(err)
	}
	sv := svcs[loader.ServiceKey{Addr: loader.AddrToBE(vip), Port: loader.PortToBE(80), Proto: packet.ProtoTCP}]
	if sv.Flags&loader.SvcFlagMaglev == 0 {
		t.Fatalf("frontend flags %#x lack Maglev", sv.Flags)
	}
	var o loader.SvcOpts
	if err := fr.m.Opts.Lookup(sv.Id, &o); err != nil {
		t.Fatal(err)
	}
	blocks, _ := fr.m.DumpMaglev()
	slots, _ := fr.m.DumpBackends()
	return func(src netip.Addr, sport uint16) netip.Addr {
		idx := loader.LBTupleHash(src, vip, sport, 80, packet.ProtoTCP) % o.MaglevSize
		slot := blocks[loader.MaglevKey{SvcId: sv.Id, Block: idx / loader.MaglevBlock}].Slot[idx%loader.MaglevBlock]
		b, ok := slots[loader.BackendKey{SvcId: sv.Id, Slot: uint32(slot)}]
		if !ok {
			t.Fatalf("table entry %d names slot %d, which is empty", idx, slot)
		}
		return loader.BEToAddr(b.Addr)
	}
}

func TestMaglevSelection(t *testing.T) {
	const n, flows = 5, 2000
	bs := backendsN(n)
	fr := newFeatureRig(t, service.Options{MaglevSize: 1}, bs...)
	predict := maglevPrediction(t, fr)
	tuple := func(i int) (netip.Addr, uint16) { return clientN(i % 50), uint16(20000 + i) }

	before := make([]netip.Addr, flows)
	share := map[netip.Addr]int{}
	for i := range flows {
		src, sport := tuple(i)
		before[i] = fr.syn(src, sport)
		if want := predict(src, sport); before[i] != want {
			t.Fatalf("flow %s:%d went to %s, its table entry names %s", src, sport, before[i], want)
		}
		share[before[i]]++
	}
	// Distribution: each backend holds 1/5 of the table; 2,000 tuples give each 400 ± 18
	// (one standard deviation); allow ±25%.
	for _, b := range bs {
		if got := share[b.Addr]; got < flows/n*3/4 || got > flows/n*5/4 {
			t.Errorf("backend %s got %d of %d flows, want about %d", b.Addr, got, flows, flows/n)
		}
	}

	// Stability: a backend leaves; new flows of the same tuples (conntrack forgotten, so
	// each is chosen again) stay where they were unless they were on the one that left.
	gone := bs[2].Addr
	fr.set(append(append([]service.Backend(nil), bs[:2]...), bs[3:]...)...)
	fr.forgetFlows()
	predict = maglevPrediction(t, fr)
	movedSurvivors, survivors := 0, 0
	for i := range flows {
		src, sport := tuple(i)
		got := fr.syn(src, sport)
		if got == gone {
			t.Fatalf("flow %s:%d went to the removed backend", src, sport)
		}
		if want := predict(src, sport); got != want {
			t.Fatalf("after the change flow %s:%d went to %s, its table entry names %s", src, sport, got, want)
		}
		if before[i] != gone {
			survivors++
			if got != before[i] {
				movedSurvivors++
			}
		}
	}
	// The table builder moves at most 4% of the entries between surviving backends
	// (service.TestMaglevRemovalMovesAboutOneNth); random selection would move 80%.
	frac := float64(movedSurvivors) / float64(survivors)
	t.Logf("after removing 1 of %d backends, %d of %d flows on surviving backends moved (%.1f%%)", n, movedSurvivors, survivors, 100*frac)
	if frac > 0.06 {
		t.Fatalf("%.1f%% of the flows on surviving backends moved, want at most 6%%", 100*frac)
	}
}

func TestInternalTrafficPolicyLocalWithoutLocalEndpoints(t *testing.T) {
	for _, c := range []struct {
		name        string
		opts        service.Options
		backends    []service.Backend
		wantVerdict uint32
		wantReason  loader.Reason
	}{
		// Endpoints elsewhere, none here: kube-proxy's "has no local endpoints" DROP.
		{"no local endpoint drops", service.Options{DropWhenEmpty: true}, nil, verdictShot, loader.ReasonDropNoLocalBackend},
		// No endpoints at all: REJECT, whatever the policy.
		{"no endpoint rejects", service.Options{}, nil, verdictRedirect, loader.ReasonSvcReject},
		// The local endpoint serves.
		{"local endpoint serves", service.Options{}, backendsN(1), verdictOK, loader.ReasonSvcForward},
	} {
		t.Run(c.name, func(t *testing.T) {
			fr := newFeatureRig(t, c.opts, c.backends...)
			// The same for the UDP twin of the frontend (a reject is then ICMP unreachable).
			fr.fe.Proto = service.UDP
			fr.set(c.backends...)
			for _, f := range []packet.Frame{tcp(client, 40000, vip, 80, packet.SYN), udp(client, 40000, vip, 80, "q")} {
				if v, _ := loadertest.Run(t, fr.d.FromPod(), f.Build()); v != c.wantVerdict {
					t.Fatalf("protocol %d: verdict %d, want %d", f.Proto, v, c.wantVerdict)
				}
			}
			if got := loadertest.Metric(t, fr.m, c.wantReason, loader.DirFromPod); got != 2 {
				t.Fatalf("%s counted %d, want 2 (TCP and UDP)", c.wantReason, got)
			}
		})
	}
}

// A client stuck to the backend in the last slot keeps it when another backend leaves and
// the last one is moved into the hole: affinity finds the backend's new slot through the
// membership index (the e2e suite caught a client losing its backend this way).
func TestAffinityFollowsAMovedBackend(t *testing.T) {
	bs := backendsN(3) // created in this order: slot 3 holds bs[2]
	fr := newFeatureRig(t, service.Options{AffinitySeconds: service.DefaultAffinitySeconds}, bs...)
	var cl netip.Addr
	// Each client's first pick is random: one of 50 gets slot 3 but with probability
	// 1 - (2/3)^50.
	for i := range 50 {
		if fr.syn(clientN(i), 40000) == bs[2].Addr {
			cl = clientN(i)
			break
		}
	}
	if !cl.IsValid() {
		t.Fatal("no client's first flow went to the backend in the last slot")
	}
	fr.set(bs[1], bs[2]) // bs[0] leaves slot 1; bs[2] moves there
	slots, err := fr.m.DumpBackends()
	if err != nil {
		t.Fatal(err)
	}
	if len(slots) != 2 {
		t.Fatalf("%d slots after the removal, want 2", len(slots))
	}
	for port := uint16(40001); port < 40031; port++ {
		if got := fr.syn(cl, port); got != bs[2].Addr {
			t.Fatalf("client %s, stuck to %s, went to %s after that backend changed slots", cl, bs[2].Addr, got)
		}
	}
}
