package loader_test

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policymap"
)

// TestExclusiveBackendIngressPolicy: a local exclusive-ENI backend (IPC_F_LOCAL |
// IPC_F_EXCLUSIVE) sees the node's address for the flows translated to it, so its ingress
// policy is judged where the flow opens, against the real client (bpf/lib/policy.h,
// policy_local_backend_ingress): an exclusive client pod on tern_from_pod, an external
// NodePort client on tern_from_netdev. An allowed client is translated as before; a denied
// one is dropped as drop_policy in that hook's direction, counted against the isolating
// policy's slot as an ingress denial, reported by one policy event naming the backend, the
// real client and the backend's port, and leaves no flow. Without IPC_F_POLICY (policy not
// enforced on the backend) nothing is judged.
func TestExclusiveBackendIngressPolicy(t *testing.T) {
	h := newNP(t)
	pm := h.d.PolicyMaps()
	const (
		backendID = policy.Identity(500)
		allowedID = policy.Identity(600)
		deniedID  = policy.Identity(601)
		cidrID    = policy.Identity(0x80000001)
		slot      = 7
	)
	exBackend := netip.MustParseAddr("10.0.1.12")
	allowedExt := netip.MustParseAddr("198.51.100.10")
	deniedExt := netip.MustParseAddr("198.51.100.11")
	backendFlags := uint16(loader.IPCacheFlagLocal | loader.IPCacheFlagPod | loader.IPCacheFlagExclusive | loader.IPCacheFlagPolicy)
	ipcache := func(a netip.Addr, id policy.Identity, flags uint16) {
		t.Helper()
		if err := h.m.PutIPCache(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(a)},
			loader.IPCacheValue{Identity: uint32(id), Flags: flags}); err != nil {
			t.Fatal(err)
		}
	}
	ipcache(exBackend, backendID, backendFlags)
	ipcache(client, allowedID, loader.IPCacheFlagLocal|loader.IPCacheFlagPod)
	// The client pod: exclusive, on the test run's ifindex (loopback, 1).
	if err := h.m.PutEndpoint(loader.EndpointKey{Ifindex: 1}, loader.EndpointValue{Addr: loader.AddrToBE(client),
		Flags: loader.EndpointFlagExclusive, Identity: uint32(allowedID)}); err != nil {
		t.Fatal(err)
	}
	h.frontend(t, 1, vip, 82, packet.ProtoTCP, 0, loadertest.B(exBackend.String(), 8080))
	h.frontend(t, 2, nodeAddr, 30090, packet.ProtoTCP, uint16(loader.SvcFlagExternal), loadertest.B(exBackend.String(), 8080))

	// The backend takes TCP 8080 from identity allowedID and from allowedExt/32 only.
	if err := pm.Isolation.Put(uint32(backendID), loader.PolicyIsoValue{Flags: policy.IsolatedIngress}); err != nil {
		t.Fatal(err)
	}
	for _, peer := range []policy.Identity{allowedID, cidrID} {
		k := policymap.RuleKey(policy.RuleKey{Subject: backendID, Peer: peer, Dir: policy.Ingress, Proto: packet.ProtoTCP, Port: 8080, PortBits: 16})
		if err := pm.Rules.Put(k, loader.PolicyValue{Policy: slot}); err != nil {
			t.Fatal(err)
		}
	}
	if err := pm.Rules.Put(policymap.IsolatorKey(backendID, policy.Ingress), loader.PolicyValue{Policy: slot}); err != nil {
		t.Fatal(err)
	}
	if err := pm.CIDRs.Put(policymap.CIDRKey(netip.PrefixFrom(allowedExt, 32)), loader.PolicyCIDRValue{Identity: uint32(cidrID)}); err != nil {
		t.Fatal(err)
	}
	events, err := ebpf.LoadPinnedMap(h.d.Config().PinRoot+"/"+loader.PodMapTernEvents, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer events.Close()
	rd, err := ringbuf.NewReader(events)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()

	type step struct {
		name       string
		fromNetdev bool
		frame      []byte
		verdict    uint32
		reason     loader.Reason
		dir        loader.Direction
		peer       netip.Addr // a denial's policy event names this client
	}
	run := func(s step) {
		t.Helper()
		prog := h.d.FromPod()
		if s.fromNetdev {
			prog = h.d.FromNetdev()
		}
		before := loadertest.Metric(t, h.m, s.reason, s.dir)
		denied := ingressDenied(t, pm)
		_ = policyEvents(t, rd)
		v, _ := h.run(t, prog, s.frame)
		if v != s.verdict {
			t.Fatalf("%s: verdict %d, want %d", s.name, v, s.verdict)
		}
		if got := loadertest.Metric(t, h.m, s.reason, s.dir) - before; got != 1 {
			t.Fatalf("%s: %d packets counted under %s/%s, want 1", s.name, got, s.reason, s.dir)
		}
		gotDenied := ingressDenied(t, pm) - denied
		evs := policyEvents(t, rd)
		if !s.peer.IsValid() {
			if gotDenied != 0 {
				t.Fatalf("%s: %d ingress denials counted, want none", s.name, gotDenied)
			}
			return
		}
		if gotDenied != 1 {
			t.Fatalf("%s: %d ingress denials counted against slot %d, want 1", s.name, gotDenied, slot)
		}
		if len(evs) != 1 {
			t.Fatalf("%s: %d policy events, want 1 denial: %+v", s.name, len(evs), evs)
		}
		ev := evs[0]
		if ev.Subject != uint32(backendID) || ev.Slot != slot || loader.BEToAddr(ev.Peer) != s.peer ||
			ev.Port != loader.PortToBE(8080) || ev.PolicyDir != uint8(policy.Ingress) || ev.Verdict != loader.PolicyVerdictDeny ||
			uint8(ev.Pkt.Reason) != uint8(loader.ReasonDropPolicy) || uint8(ev.Pkt.Dir) != uint8(s.dir) {
			t.Fatalf("%s: policy event %+v", s.name, ev)
		}
	}

	run(step{"allowed exclusive pod: translated to the node", false, tcp(client, 41000, vip, 82, packet.SYN).Build(),
		verdictRedirect, loader.ReasonNodePortSNAT, loader.DirFromPod, netip.Addr{}})
	run(step{"allowed exclusive pod: established packet not judged again", false, tcp(client, 41000, vip, 82, packet.ACK).Build(),
		verdictRedirect, loader.ReasonNodePortSNAT, loader.DirFromPod, netip.Addr{}})
	run(step{"allowed external client: translated to the node", true, tcp(allowedExt, 5000, nodeAddr, 30090, packet.SYN).Build(),
		verdictRedirect, loader.ReasonNodePortSNAT, loader.DirFromNetdev, netip.Addr{}})
	run(step{"denied external client: dropped", true, tcp(deniedExt, 5001, nodeAddr, 30090, packet.SYN).Build(),
		verdictShot, loader.ReasonDropPolicy, loader.DirFromNetdev, deniedExt})
	// The same client pod with an identity the policy does not name.
	ipcache(client, deniedID, loader.IPCacheFlagLocal|loader.IPCacheFlagPod)
	run(step{"denied exclusive pod: dropped", false, tcp(client, 41001, vip, 82, packet.SYN).Build(),
		verdictShot, loader.ReasonDropPolicy, loader.DirFromPod, client})
	var ct loader.CTValue
	if err := h.m.CT.Lookup(loader.CTFlowKey(client, 41001, vip, 82, packet.ProtoTCP), &ct); !loader.IsNotExist(err) {
		t.Fatalf("a denied flow left a conntrack entry: %+v, %v", ct, err)
	}
	// Policy not enforced on the backend (no IPC_F_POLICY): not judged.
	ipcache(exBackend, backendID, backendFlags&^loader.IPCacheFlagPolicy)
	run(step{"policy not enforced on the backend: translated", false, tcp(client, 41002, vip, 82, packet.SYN).Build(),
		verdictRedirect, loader.ReasonNodePortSNAT, loader.DirFromPod, netip.Addr{}})
}

// ingressDenied is slot 7's denied ingress packets (TestExclusiveBackendIngressPolicy).
func ingressDenied(t *testing.T, pm *loader.PolicyMaps) uint64 {
	t.Helper()
	c, err := loader.ReadPolicyStats(pm.Stats, 7, uint8(policy.Ingress))
	if err != nil {
		t.Fatal(err)
	}
	return c.DeniedPackets
}
