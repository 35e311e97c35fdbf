package loader_test

import (
	"net/netip"
	"testing"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// TestExclusivePodServiceSNAT: the packet table of an exclusive-ENI pod's Service flows
// (bpf/lib/exclusive.h). The pod (client, endpoint flagged exclusive) reaching a remote
// backend through a ClusterIP is translated to the backend and the node's address and sent
// by the FIB; the backend's reply to the node, on from-netdev, is restored to ClusterIP ->
// pod; a local backend keeps the DNAT-only path; the same pod without the flag (an ENIIP pod)
// keeps its address to the remote backend. An exclusive pod of this node as the backend
// (IPC_F_EXCLUSIVE): an exclusive client's flow and an external client's NodePort flow are
// translated to the node's address too, and the backend's reply to the node, on its own
// from-pod, is restored; an ENIIP client's flow to it stays DNAT only.
func TestExclusivePodServiceSNAT(t *testing.T) {
	h := newNP(t)
	local := netip.MustParseAddr("10.0.1.11")
	if err := h.m.PutIPCache(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(local)},
		loader.IPCacheValue{Flags: loader.IPCacheFlagLocal | loader.IPCacheFlagPod}); err != nil {
		t.Fatal(err)
	}
	h.frontend(t, 1, vip, 80, packet.ProtoTCP, 0, loadertest.B(be1.String(), 8080))
	h.frontend(t, 2, vip, 53, packet.ProtoUDP, 0, loadertest.B(be1.String(), 5353))
	h.frontend(t, 3, vip, 81, packet.ProtoTCP, 0, loadertest.B(local.String(), 8080))
	// An exclusive-ENI pod of this node as the backend, of a ClusterIP and a NodePort.
	exBackend := netip.MustParseAddr("10.0.1.12")
	if err := h.m.PutIPCache(loader.IPCacheKey{Prefixlen: 32, Addr: loader.AddrToBE(exBackend)},
		loader.IPCacheValue{Flags: loader.IPCacheFlagLocal | loader.IPCacheFlagPod | loader.IPCacheFlagExclusive}); err != nil {
		t.Fatal(err)
	}
	h.frontend(t, 4, vip, 82, packet.ProtoTCP, 0, loadertest.B(exBackend.String(), 8080))
	h.frontend(t, 5, vip, 54, packet.ProtoUDP, 0, loadertest.B(exBackend.String(), 5353))
	h.frontend(t, 6, nodeAddr, 30090, packet.ProtoTCP, uint16(loader.SvcFlagExternal), loadertest.B(exBackend.String(), 8080))
	external := netip.MustParseAddr("198.51.100.10")
	endpoint := func(flags uint16) {
		t.Helper()
		// A test run's skb is on the namespace's loopback: ifindex 1.
		if err := h.m.PutEndpoint(loader.EndpointKey{Ifindex: 1}, loader.EndpointValue{Addr: loader.AddrToBE(client), Flags: flags}); err != nil {
			t.Fatal(err)
		}
	}
	endpoint(loader.EndpointFlagExclusive)

	type step struct {
		name        string
		fromNetdev  bool
		frame       []byte
		wantVerdict uint32
		wantSrc     netip.Addr
		wantSport   uint16
		wantDst     netip.Addr
		wantDport   uint16
		reason      loader.Reason
		dir         loader.Direction
	}
	steps := []step{
		{"remote backend: syn DNAT + SNAT to the node", false, tcp(client, 21000, vip, 80, packet.SYN).Build(),
			verdictRedirect, nodeAddr, 21000, be1, 8080, loader.ReasonNodePortSNAT, loader.DirFromPod},
		{"remote backend: syn-ack to the node restored to ClusterIP -> pod", true, tcp(be1, 8080, nodeAddr, 21000, packet.SYN|packet.ACK).Build(),
			verdictRedirect, vip, 80, client, 21000, loader.ReasonNodePortRevNAT, loader.DirFromNetdev},
		{"remote backend: established ack", false, tcp(client, 21000, vip, 80, packet.ACK).Build(),
			verdictRedirect, nodeAddr, 21000, be1, 8080, loader.ReasonNodePortSNAT, loader.DirFromPod},
		{"remote backend: udp", false, udp(client, 6000, vip, 53, "q").Build(),
			verdictRedirect, nodeAddr, 6000, be1, 5353, loader.ReasonNodePortSNAT, loader.DirFromPod},
		{"remote backend: udp answer", true, udp(be1, 5353, nodeAddr, 6000, "a").Build(),
			verdictRedirect, vip, 53, client, 6000, loader.ReasonNodePortRevNAT, loader.DirFromNetdev},
		{"local backend: DNAT only, the pod's address kept", false, tcp(client, 41001, vip, 81, packet.SYN).Build(),
			verdictOK, client, 41001, local, 8080, loader.ReasonSvcForward, loader.DirFromPod},
		// The backend's replies reach the node through its veth: its from-pod restores them.
		{"exclusive local backend: syn DNAT + SNAT to the node", false, tcp(client, 21003, vip, 82, packet.SYN).Build(),
			verdictRedirect, nodeAddr, 21003, exBackend, 8080, loader.ReasonNodePortSNAT, loader.DirFromPod},
		{"exclusive local backend: syn-ack to the node restored to ClusterIP -> pod", false, tcp(exBackend, 8080, nodeAddr, 21003, packet.SYN|packet.ACK).Build(),
			verdictRedirect, vip, 82, client, 21003, loader.ReasonNodePortRevNAT, loader.DirFromPod},
		{"exclusive local backend: udp", false, udp(client, 6001, vip, 54, "q").Build(),
			verdictRedirect, nodeAddr, 6001, exBackend, 5353, loader.ReasonNodePortSNAT, loader.DirFromPod},
		{"exclusive local backend: udp answer", false, udp(exBackend, 5353, nodeAddr, 6001, "a").Build(),
			verdictRedirect, vip, 54, client, 6001, loader.ReasonNodePortRevNAT, loader.DirFromPod},
		{"external client, exclusive local backend: DNAT + SNAT to the node", true, tcp(external, 5000, nodeAddr, 30090, packet.SYN).Build(),
			verdictRedirect, nodeAddr, 5000, exBackend, 8080, loader.ReasonNodePortSNAT, loader.DirFromNetdev},
		{"external client, exclusive local backend: syn-ack restored on from-pod", false, tcp(exBackend, 8080, nodeAddr, 5000, packet.SYN|packet.ACK).Build(),
			verdictRedirect, nodeAddr, 30090, external, 5000, loader.ReasonNodePortRevNAT, loader.DirFromPod},
	}
	run := func(s step) {
		t.Helper()
		prog := h.d.FromPod()
		if s.fromNetdev {
			prog = h.d.FromNetdev()
		}
		before := loadertest.Metric(t, h.m, s.reason, s.dir)
		v, out := h.run(t, prog, s.frame)
		if v != s.wantVerdict {
			t.Fatalf("%s: verdict %d, want %d", s.name, v, s.wantVerdict)
		}
		if got := loadertest.Metric(t, h.m, s.reason, s.dir) - before; got != 1 {
			t.Fatalf("%s: %d packets counted under %s/%s, want 1", s.name, got, s.reason, s.dir)
		}
		p := parse(t, out)
		wantAddrPort(t, s.name+": source", p.Src, p.SrcPort, s.wantSrc, s.wantSport)
		wantAddrPort(t, s.name+": destination", p.Dst, p.DstPort, s.wantDst, s.wantDport)
	}
	// The backend's veth sees the translated SYN come in (tern_to_pod tracks it as the
	// pod's flow); its from-pod must keep that entry informed of the replies it restores.
	if v, _ := h.run(t, h.d.ToPod(), tcp(nodeAddr, 21003, exBackend, 8080, packet.SYN).Build()); v != verdictOK {
		t.Fatalf("to-pod of the translated syn: verdict %d, want %d", v, verdictOK)
	}
	for _, s := range steps {
		run(s)
	}
	var backendHalf loader.CTValue
	if err := h.m.CT.Lookup(loader.CTFlowKey(nodeAddr, 21003, exBackend, 8080, packet.ProtoTCP), &backendHalf); err != nil {
		t.Fatalf("the backend's entry of the translated flow: %v", err)
	}
	if backendHalf.Flags&loader.CTFlagSeenReply == 0 {
		t.Fatalf("the backend's entry of the translated flow did not hear the restored reply: %+v", backendHalf)
	}
	// The same pod as an ENIIP pod: its flow to the remote backend keeps its address.
	endpoint(0)
	run(step{"not exclusive: DNAT only", false, tcp(client, 41002, vip, 80, packet.SYN).Build(),
		verdictOK, client, 41002, be1, 8080, loader.ReasonSvcForward, loader.DirFromPod})
	// An ENIIP client of the exclusive backend keeps its address: the backend's answer
	// crosses the VPC to the client's node and is restored on the client's veth.
	run(step{"not exclusive, exclusive local backend: DNAT only", false, tcp(client, 41004, vip, 82, packet.SYN).Build(),
		verdictOK, client, 41004, exBackend, 8080, loader.ReasonSvcForward, loader.DirFromPod})
	// Only an exclusive pod's packet to the node is taken for a reply: the same answer from
	// an ENIIP endpoint goes on untranslated.
	if v, out := h.run(t, h.d.FromPod(), tcp(exBackend, 8080, nodeAddr, 21003, packet.ACK).Build()); v != verdictOK {
		t.Fatalf("ENIIP endpoint's packet to the node: verdict %d, want %d", v, verdictOK)
	} else if p := parse(t, out); p.Src != exBackend || p.Dst != nodeAddr {
		t.Fatalf("ENIIP endpoint's packet to the node was rewritten: %s -> %s", p.Src, p.Dst)
	}
}
