package loader_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/policy"
)

// In policyState the policies are [a/web, a/client]: the default slots are 1 and 2.
const (
	slotWeb    = 1
	slotClient = 2
)

func policyCounters(t *testing.T, pd *policyDP, slot uint32, dir policy.Direction) loader.PolicyCounters {
	t.Helper()
	c, err := loader.ReadPolicyStats(pd.d.PolicyMaps().Stats, slot, uint8(dir))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func policyEvents(t *testing.T, rd *ringbuf.Reader) []loader.PolicyEvent {
	t.Helper()
	var out []loader.PolicyEvent
	for {
		rd.SetDeadline(time.Now())
		rec, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		var ev loader.PolicyEvent
		if len(rec.RawSample) != binary.Size(ev) {
			t.Fatalf("event of %d bytes, want a policy event of %d", len(rec.RawSample), binary.Size(ev))
		}
		if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &ev); err != nil {
			t.Fatal(err)
		}
		out = append(out, ev)
	}
}

// TestPolicyCountersAndEvents: each verdict is counted against the policy that decided it
// (an allow against the rule's policy, a denial against the policy isolating the pod), once
// per flow for allows (the first packet creates the conntrack entry with the verdict, so
// later packets are not judged) and per packet for denials; a denial sends one policy
// event naming the slot, the peer and the port, and no second drop event.
func TestPolicyCountersAndEvents(t *testing.T) {
	pd := newPolicyDP(t)
	events, err := ebpf.LoadPinnedMap(pd.d.Config().PinRoot+"/"+loader.PodMapTernEvents, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer events.Close()
	rd, err := ringbuf.NewReader(events)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()

	syn := tcp(clientIP, 40000, webIP, 8080, packet.SYN)
	pd.run(t, []policyRow{
		{"client SYN: allowed by a/web", webIP, false, syn, remote, verdictOK},
		{"client ACK: cached from the first packet", webIP, false, tcp(clientIP, 40000, webIP, 8080, packet.ACK), remote, verdictOK},
		{"client data: cached", webIP, false, tcp(clientIP, 40000, webIP, 8080, packet.ACK), remote, verdictOK},
		{"other -> web: denied, a/web isolates web", webIP, false, tcp(otherIP, 40001, webIP, 8080, packet.SYN), remote, verdictShot},
		{"other -> web again: denied", webIP, false, tcp(otherIP, 40001, webIP, 8080, packet.SYN), remote, verdictShot},
		{"client -> other: denied, a/client isolates client's egress", clientIP, true, tcp(clientIP, 41001, otherIP, 80, packet.SYN), 0, verdictShot},
		{"client -> web:8080: allowed by a/client", clientIP, true, tcp(clientIP, 41000, webIP, 8080, packet.SYN), 0, verdictOK},
		{"other is not isolated: not counted", otherIP, true, tcp(otherIP, 42000, clientIP, 9, packet.SYN), 0, verdictOK},
	})
	synLen := uint64(len(syn.Build()))
	if c := policyCounters(t, pd, slotWeb, policy.Ingress); c.AllowedPackets != 1 || c.DeniedPackets != 2 || c.AllowedBytes != synLen {
		t.Errorf("a/web ingress: %+v, want 1 allowed (%d bytes), 2 denied", c, synLen)
	}
	if c := policyCounters(t, pd, slotClient, policy.Egress); c.AllowedPackets != 1 || c.DeniedPackets != 1 {
		t.Errorf("a/client egress: %+v, want 1 allowed, 1 denied", c)
	}
	for _, s := range []struct {
		slot uint32
		dir  policy.Direction
	}{{slotWeb, policy.Egress}, {slotClient, policy.Ingress}, {0, policy.Ingress}, {0, policy.Egress}} {
		if c := policyCounters(t, pd, s.slot, s.dir); c != (loader.PolicyCounters{}) {
			t.Errorf("slot %d %s counted %+v, want nothing", s.slot, s.dir, c)
		}
	}

	evs := policyEvents(t, rd)
	if len(evs) != 3 {
		t.Fatalf("%d events, want 3 (the denials; allowed events are off): %+v", len(evs), evs)
	}
	e := evs[0]
	if e.Pkt.Kind != loader.EventKindPolicy || e.Pkt.Reason != loader.ReasonDropPolicy || e.Pkt.Dir != loader.DirToPod ||
		e.Slot != slotWeb || e.PolicyDir != uint8(policy.Ingress) || e.Verdict != loader.PolicyVerdictDeny ||
		loader.BEToAddr(e.Peer) != otherIP || loader.BEToPort(e.Port) != 8080 ||
		e.Subject != uint32(pd.desired.IPCache[webIP]) || e.PeerIdentity != uint32(pd.desired.IPCache[otherIP]) ||
		loader.BEToAddr(e.Pkt.Saddr) != otherIP {
		t.Errorf("first denial event %+v", e)
	}
	if e := evs[2]; e.Slot != slotClient || e.PolicyDir != uint8(policy.Egress) || loader.BEToAddr(e.Peer) != otherIP ||
		loader.BEToPort(e.Port) != 80 || e.Pkt.Dir != loader.DirFromPod {
		t.Errorf("egress denial event %+v", e)
	}
}

// TestPolicyAllowedEvents: with PolicyAllowedEvents an allowed new flow sends one event
// naming its policy; its next packets send none.
func TestPolicyAllowedEvents(t *testing.T) {
	pd := newPolicyDPWith(t, loader.Config{PolicyAllowedEvents: true})
	events, err := ebpf.LoadPinnedMap(pd.d.Config().PinRoot+"/"+loader.PodMapTernEvents, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer events.Close()
	rd, err := ringbuf.NewReader(events)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	pd.run(t, []policyRow{
		{"client SYN", webIP, false, tcp(clientIP, 40000, webIP, 8080, packet.SYN), remote, verdictOK},
		{"client ACK", webIP, false, tcp(clientIP, 40000, webIP, 8080, packet.ACK), remote, verdictOK},
	})
	evs := policyEvents(t, rd)
	if len(evs) != 1 || evs[0].Pkt.Reason != loader.ReasonPolicyAllowed || evs[0].Verdict != loader.PolicyVerdictAllow ||
		evs[0].Slot != slotWeb {
		t.Fatalf("events %+v, want one policy_allowed of slot %d", evs, slotWeb)
	}
}

// icmpState: web (ingress isolated) takes client on TCP 8080 only and admin with no ports
// (an L3-only rule); client's egress allows web on 8080 only.
func icmpState() policy.State {
	st := policyState(true)
	st.Pods = append(st.Pods, npod("admin", adminIP, "admin"))
	st.Policies[0].Spec.Ingress = append(st.Policies[0].Spec.Ingress, networkingv1.NetworkPolicyIngressRule{
		From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "admin"}}}}})
	return st
}

var adminIP = netip.MustParseAddr("10.0.0.4")

func icmp(src, dst netip.Addr, typ uint8) packet.Frame {
	return packet.Frame{Src: src, Dst: dst, Proto: packet.ProtoICMP, ICMPType: typ, Payload: []byte("ping")}
}

// TestPolicyICMP: an isolated pod's ICMP queries pass only through rules without ports
// (Cilium's choice); replies and errors pass; a pod that is not isolated is not judged.
func TestPolicyICMP(t *testing.T) {
	pd := newPolicyDP(t)
	pd.sync(t, icmpState(), nil)
	const echo, echoReply, unreach, timestamp = 8, 0, 3, 13
	pd.run(t, []policyRow{
		{"admin pings web: L3-only rule", webIP, false, icmp(adminIP, webIP, echo), remote, verdictOK},
		{"client pings web: its rule has ports", webIP, false, icmp(clientIP, webIP, echo), remote, verdictShot},
		{"client timestamp request to web: a query too", webIP, false, icmp(clientIP, webIP, timestamp), remote, verdictShot},
		{"an echo reply into web passes", webIP, false, icmp(otherIP, webIP, echoReply), remote, verdictOK},
		{"an unreachable into web passes", webIP, false, icmp(otherIP, webIP, unreach), remote, verdictOK},
		{"the node pings web", webIP, false, icmp(nodeIP, webIP, echo), 0, verdictOK},
		{"web pings other: egress default deny", webIP, true, icmp(webIP, otherIP, echo), 0, verdictShot},
		{"web answers admin's ping", webIP, true, icmp(webIP, adminIP, echoReply), 0, verdictOK},
		{"client pings web: client's egress rule has ports", clientIP, true, icmp(clientIP, webIP, echo), 0, verdictShot},
		{"other (not isolated) pings client", otherIP, true, icmp(otherIP, clientIP, echo), 0, verdictOK},
	})
	// The reference evaluator and the compiled maps' mirror agree on the same cases.
	for _, c := range []struct {
		from, to netip.Addr
		want     bool
	}{{adminIP, webIP, true}, {clientIP, webIP, false}, {webIP, otherIP, false}, {otherIP, clientIP, true}} {
		eg, in := pd.desired.Decide(c.from, c.to, packet.ProtoICMP, 0)
		if (eg && in) != c.want {
			t.Errorf("Decide ICMP %s -> %s: egress %v ingress %v, want %v", c.from, c.to, eg, in, c.want)
		}
	}
}
