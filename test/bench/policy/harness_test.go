package main

import (
	"context"
	"testing"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/test/bench/progrun"
)

// TestHarnessMeasuresWhatItClaims runs the benchmark at a tiny size and checks that its
// rows are the paths they are named after: every measured packet passes, and on the
// endpoint with rules, once every rule is deleted, the "established" frames still pass
// (their verdict is cached in conntrack: no lookup) while a new flow's first packet is
// dropped (it pays the whole lookup).
func TestHarnessMeasuresWhatItClaims(t *testing.T) {
	testutil.RequirePrivileged(t)
	p := params{rules: []int{0, 100}, flows: 2000, newFlows: 200, peers: 500, rounds: 1, churn: 1}
	b, err := setup(context.Background(), p)
	defer b.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := b.measure(context.Background()); err != nil {
		t.Fatal(err)
	}
	s := b.subjects[1]
	rules := s.dp.PolicyMaps().Rules
	var keys []loader.PolicyKey
	var (
		k loader.PolicyKey
		v loader.PolicyValue
	)
	for it := rules.Iterate(); it.Next(&k, &v); {
		keys = append(keys, k)
	}
	if len(keys) != 2*100 {
		t.Fatalf("the endpoint has %d rule entries, want 200", len(keys))
	}
	for _, k := range keys {
		if err := rules.Delete(k); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.pass(s.to, &s.estIn, 0, p.flows, "to-pod established, no rules left"); err != nil {
		t.Fatalf("an established flow was judged again: %v", err)
	}
	if _, err := s.pass(s.from, &s.estOut, 0, p.flows, "from-pod established, no rules left"); err != nil {
		t.Fatalf("an established flow was judged again: %v", err)
	}
	out := make([]byte, 256)
	for _, c := range []struct {
		name  string
		isTo  bool
		frame []byte
	}{
		{name: "to-pod", isTo: true, frame: tcpFrame(peerAddr(1), 65000, podAddr, servicePort, packet.SYN)},
		{name: "from-pod", frame: tcpFrame(podAddr, 65000, peerAddr(1), servicePort, packet.SYN)},
	} {
		prog := s.from
		if c.isTo {
			prog = s.to
		}
		verdict, _, _, err := progrun.RunWithContext(prog, c.frame, out, s.runCtx(prog))
		if err != nil {
			t.Fatal(err)
		}
		if verdict != tcActShot {
			t.Fatalf("%s: a new flow's SYN with no rules left: verdict %d, want dropped", c.name, verdict)
		}
	}
}
