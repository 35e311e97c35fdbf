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
// keeps its address to the remote backend.
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
		{"remote backend: syn DNAT + SNAT to the node", false, tcp(client, 41000, vip, 80, packet.SYN).Build(),
			verdictRedirect, nodeAddr, 41000, be1, 8080, loader.ReasonNodePortSNAT, loader.DirFromPod},
		{"remote backend: syn-ack to the node restored to ClusterIP -> pod", true, tcp(be1, 8080, nodeAddr, 41000, packet.SYN|packet.ACK).Build(),
			verdictRedirect, vip, 80, client, 41000, loader.ReasonNodePortRevNAT, loader.DirFromNetdev},
		{"remote backend: established ack", false, tcp(client, 41000, vip, 80, packet.ACK).Build(),
			verdictRedirect, nodeAddr, 41000, be1, 8080, loader.ReasonNodePortSNAT, loader.DirFromPod},
		{"remote backend: udp", false, udp(client, 6000, vip, 53, "q").Build(),
			verdictRedirect, nodeAddr, 6000, be1, 5353, loader.ReasonNodePortSNAT, loader.DirFromPod},
		{"remote backend: udp answer", true, udp(be1, 5353, nodeAddr, 6000, "a").Build(),
			verdictRedirect, vip, 53, client, 6000, loader.ReasonNodePortRevNAT, loader.DirFromNetdev},
		{"local backend: DNAT only, the pod's address kept", false, tcp(client, 41001, vip, 81, packet.SYN).Build(),
			verdictOK, client, 41001, local, 8080, loader.ReasonSvcForward, loader.DirFromPod},
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
	for _, s := range steps {
		run(s)
	}
	// The same pod as an ENIIP pod: its flow to the remote backend keeps its address.
	endpoint(0)
	run(step{"not exclusive: DNAT only", false, tcp(client, 41002, vip, 80, packet.SYN).Build(),
		verdictOK, client, 41002, be1, 8080, loader.ReasonSvcForward, loader.DirFromPod})
}
