package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/test/bench/progrun"
)

// v1CTValue is v1's struct ct_value (loader/testdata/v1, commit 4a213e3).
type v1CTValue struct {
	ExpiresNs   uint64
	BackendAddr uint32
	BackendPort uint16
	Flags       uint16
	SvcID       uint32
	_           uint32
}

// TestHarnessMeasuresWhatItClaims runs the whole benchmark at a tiny size, so it cannot rot:
// every scenario runs all its frames every round, the flows it calls established are
// established in conntrack, and the frames come out translated (v1 and v2 replies with
// the VIP as source, forward frames to the flow's backend) with valid checksums.
func TestHarnessMeasuresWhatItClaims(t *testing.T) {
	testutil.RequirePrivileged(t)
	p := params{sizes: []int{1, 60}, fanout: 50, v1Fanout: 8, flows: 300, nonSvc: 100, newFlows: 50,
		rounds: 2, v1Object: "../../../loader/testdata/v1/pod_bpfel.o", seed: 7}
	noop := loader.NoopObjects{}
	if err := loader.LoadNoopObjects(&noop, nil); err != nil {
		t.Fatal(err)
	}
	defer noop.Close()
	ctx := context.Background()
	b, err := setup(ctx, p, noop.TernNoop)
	defer b.Close()
	if err != nil {
		t.Fatal(err)
	}
	// v1 and v2 at 1 and 60 Services, plus both at 60 Services with shared backends.
	if len(b.subjects) != 6 {
		t.Fatalf("%d datapaths under test, want 6", len(b.subjects))
	}
	for _, s := range b.subjects {
		if got := establishedFlows(t, s); got != p.flows {
			t.Errorf("%s: %d established service flows in conntrack after opening, want %d", s, got, p.flows)
		}
	}

	if err := b.measure(ctx); err != nil {
		t.Fatal(err)
	}
	for _, sc := range b.scenarios {
		if want := p.rounds * sc.frames(0).n; sc.runs != want || len(sc.ns) != p.rounds {
			t.Errorf("%s: %d checked runs over %d rounds, want %d over %d", sc, sc.runs, len(sc.ns), want, p.rounds)
		}
		for _, ns := range sc.ns {
			if ns <= 0 {
				t.Errorf("%s: mean %.1f ns per run", sc, ns)
			}
		}
	}

	// Independently of the harness's own checks: parse what the programs made of the
	// frames the benchmark measures.
	out := make([]byte, 256)
	for _, s := range b.subjects {
		for i, f := range s.tr.est {
			v, o, _, err := progrun.Run(s.to, s.replies.at(i), out)
			if err != nil {
				t.Fatal(err)
			}
			pp, err := packet.Parse(o)
			if err != nil || v != tcActOK || pp.Src != vipOf(f.svc) || pp.SrcPort != vipPort ||
				pp.Dst != f.client || pp.DstPort != f.port || !pp.ChecksumsOK() {
				t.Fatalf("%s: reply %s came out as verdict %d, %s (%v); want %s:%d -> %s:%d with valid checksums",
					s, describe(s.replies.at(i)), v, describe(o), err, vipOf(f.svc), vipPort, f.client, f.port)
			}
			v, o, _, err = progrun.Run(s.from, s.tr.estFwd.at(i), out)
			if err != nil {
				t.Fatal(err)
			}
			pp, err = packet.Parse(o)
			if err != nil || v != tcActOK || pp.Dst != s.backend[i] || pp.DstPort != backendPort ||
				!slices.Contains(s.topo.backends(f.svc), pp.Dst) || !pp.ChecksumsOK() {
				t.Fatalf("%s: forward %s came out as verdict %d, %s (%v); want -> one of %v:%d with valid checksums",
					s, describe(s.tr.estFwd.at(i)), v, describe(o), err, s.topo.backends(f.svc), backendPort)
			}
		}
	}

	// The checks can fail: an untranslated reply is refused.
	rep := b.find("v2", 60, true, kindRepEst)
	in := rep.s.replies.at(0)
	if err := rep.check(0, tcActOK, in, in); err == nil {
		t.Error("the reply check accepted a reply whose source is still the backend")
	}

	var report bytes.Buffer
	b.report(&report, "test")
	for _, want := range []string{"v2 scale, to pod reply: cost(60 Services) / cost(1)",
		"v2 reply / forward, 60 Services, 50 frontends per backend", "| to pod: non-service reply | 60 |"} {
		if !strings.Contains(report.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, report.String())
		}
	}
	resPath := filepath.Join(t.TempDir(), "datapath.json")
	if err := b.writeResults(resPath); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(resPath)
	if err != nil {
		t.Fatal(err)
	}
	var r results
	if err := json.Unmarshal(data, &r); err != nil {
		t.Fatalf("results %s: %v", resPath, err)
	}
	// Every scenario but the no-op baseline, which is NoopNs.
	if len(r.Medians) != len(b.scenarios)-1 || r.NoopNs <= 0 {
		t.Fatalf("results hold %d medians (want %d) and no-op %v ns", len(r.Medians), len(b.scenarios)-1, r.NoopNs)
	}
	for _, m := range r.Medians {
		if m.Ns <= 0 || m.Kind == "" {
			t.Errorf("result %+v: no median or no kind", m)
		}
	}
}

// establishedFlows counts the service flows in s's conntrack that saw a reply.
func establishedFlows(t *testing.T, s *subject) int {
	t.Helper()
	n := 0
	it := s.ct.Iterate()
	if s.version == "v1" {
		var k [16]byte
		var v v1CTValue
		for it.Next(&k, &v) {
			if v.Flags&loader.CTFlagSeenReply != 0 {
				n++
			}
		}
	} else {
		var k loader.CTKey
		var v loader.CTValue
		for it.Next(&k, &v) {
			if v.Flags&loader.CTFlagSvc != 0 && v.Flags&loader.CTFlagSeenReply != 0 {
				n++
			}
		}
	}
	if err := it.Err(); err != nil {
		t.Fatalf("%s: iterate conntrack: %v", s, err)
	}
	return n
}
