package ternctl

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"github.com/vishvananda/netlink"

	"github.com/tern-net/tern/loader"
)

// NATEntry is one tern_snat entry: a masqueraded flow, the pod's tuple and the node's.
type NATEntry struct {
	Proto string         `json:"protocol"`
	Pod   netip.AddrPort `json:"pod"`    // the pod's address and port (ICMP echo: its identifier)
	Node  netip.AddrPort `json:"node"`   // the masquerade address and port on the wire
	Peer  netip.AddrPort `json:"remote"` // the destination outside the VPC
	State string         `json:"state"`  // new, established, closing
	// ExpiresInSeconds is the time left by the flow's state (0: expired, free for reuse,
	// waiting for the agent's GC). The map keeps no creation time, so no age.
	ExpiresInSeconds int64 `json:"expiresInSeconds"`
}

// flowState names conntrack state flags (shared by tern_conntrack and tern_snat).
func flowState(flags uint16) string {
	switch {
	case flags&loader.CTFlagClosing != 0:
		return "closing"
	case flags&loader.CTFlagSeenReply != 0:
		return "established"
	}
	return "new"
}

// localAddrs are this namespace's addresses: the masquerade address is one of them.
func localAddrs() map[netip.Addr]bool {
	out := map[netip.Addr]bool{}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return out
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok {
			out[ip] = true
		}
	}
	return out
}

func bpfNATCommand(e *env) *cobra.Command {
	var pod string
	list := listCommand("Masquerade: each flow's pod tuple, node tuple, remote and time left (tern_snat)", func(cmd *cobra.Command) error {
		var want netip.Addr
		if pod != "" {
			a, err := e.podAddr(cmd.Context(), pod)
			if err != nil {
				return err
			}
			want = a
		}
		snat, err := e.openMap(loader.PodMapTernSnat)
		if err != nil {
			return err
		}
		defer snat.Close()
		entries, err := (&loader.Maps{SNAT: snat}).DumpSNAT()
		if err != nil {
			return withCode(ExitFailure, err)
		}
		now, err := monotonicNow()
		if err != nil {
			return withCode(ExitFailure, err)
		}
		local := localAddrs()
		out := []NATEntry{}
		for k, v := range entries {
			a, b := ap(k.AddrA, k.PortA), ap(k.AddrB, k.PortB)
			// The key is canonical (lower side first): the node's side is the local address.
			node, peer := a, b
			if local[b.Addr()] && !local[a.Addr()] {
				node, peer = b, a
			}
			en := NATEntry{Proto: Proto(k.Proto), Pod: ap(v.OrigAddr, v.OrigPort), Node: node, Peer: peer,
				State: flowState(v.Flags)}
			if d := time.Duration(v.ExpiresNs) - now; d > 0 {
				en.ExpiresInSeconds = int64(d.Round(time.Second) / time.Second)
			}
			if want.IsValid() && en.Pod.Addr() != want {
				continue
			}
			out = append(out, en)
		}
		sort.Slice(out, func(i, j int) bool {
			if out[i].Pod != out[j].Pod {
				return out[i].Pod.Addr().Less(out[j].Pod.Addr()) || (out[i].Pod.Addr() == out[j].Pod.Addr() && out[i].Pod.Port() < out[j].Pod.Port())
			}
			return out[i].Peer.String() < out[j].Peer.String()
		})
		return e.render(out, func() *table {
			t := &table{header: []string{"PROTO", "POD", "NODE", "REMOTE", "STATE", "EXPIRES IN"}}
			for _, n := range out {
				left := "expired"
				if n.ExpiresInSeconds > 0 {
					left = (time.Duration(n.ExpiresInSeconds) * time.Second).String()
				}
				t.add(n.Proto, n.Pod.String(), n.Node.String(), n.Peer.String(), n.State, left)
			}
			return t
		})
	})
	list.Flags().StringVar(&pod, "pod", "", "only this pod's flows (namespace/name, asked of the agent, or its address)")
	_ = list.RegisterFlagCompletionFunc("pod", e.completePods)
	return mapGroup("nat", "Masquerade translations (tern_snat)", list)
}

// Bandwidth is one tern_bandwidth entry: a pod's limits.
type Bandwidth struct {
	IfIndex   uint32     `json:"ifindex"`
	Interface string     `json:"interface,omitempty"`
	Address   netip.Addr `json:"address,omitzero"` // from tern_endpoints
	Pod       string     `json:"pod,omitempty"`    // when the agent answers
	// Rates in bits per second (the annotations' unit); 0: no limit that way.
	EgressBitsPerSecond  uint64 `json:"egressBitsPerSecond"`
	IngressBitsPerSecond uint64 `json:"ingressBitsPerSecond"`
	// Burst is how far ahead the line may be booked: the policer's bucket, or EDT's horizon.
	EgressBurst  string `json:"egressBurst,omitempty"`
	IngressBurst string `json:"ingressBurst,omitempty"`
	// Mode is the node's: edt (paced by fq) or policer; "" when the agent does not answer
	// (it is a load-time constant of the programs, not in the map).
	Mode string `json:"mode,omitempty"`
}

func bpfBandwidthCommand(e *env) *cobra.Command {
	list := listCommand("Pod bandwidth limits by host veth (tern_bandwidth)", func(cmd *cobra.Command) error {
		m, err := e.openMaps()
		if err != nil {
			return err
		}
		defer m.Close()
		if m.Bandwidth == nil {
			return withCode(ExitNoDatapath, fmt.Errorf("no %s pinned under %s: the agent there predates the bandwidth manager", loader.PodMapTernBandwidth, e.opts.PinRoot))
		}
		bws, err := m.DumpBandwidth()
		if err != nil {
			return withCode(ExitFailure, err)
		}
		eps, err := m.DumpEndpoints()
		if err != nil {
			return withCode(ExitFailure, err)
		}
		names := e.podNames(cmd.Context())
		mode := ""
		if st, err := e.client().State(cmd.Context()); err == nil {
			mode = st.BandwidthMode
		}
		burst := func(ns uint64) string {
			if ns == 0 {
				return ""
			}
			return time.Duration(ns).String()
		}
		out := []Bandwidth{}
		for k, v := range bws {
			b := Bandwidth{IfIndex: k.Ifindex, EgressBitsPerSecond: v.Egress.Rate * 8, IngressBitsPerSecond: v.Ingress.Rate * 8,
				EgressBurst: burst(v.Egress.BurstNs), IngressBurst: burst(v.Ingress.BurstNs), Mode: mode}
			if ep, ok := eps[loader.EndpointKey{Ifindex: k.Ifindex}]; ok {
				b.Address = loader.BEToAddr(ep.Addr)
				b.Pod = names[b.Address]
			}
			if l, err := netlink.LinkByIndex(int(k.Ifindex)); err == nil {
				b.Interface = l.Attrs().Name
			}
			out = append(out, b)
		}
		sort.Slice(out, func(i, j int) bool { return out[i].IfIndex < out[j].IfIndex })
		return e.render(out, func() *table {
			t := &table{header: []string{"IFINDEX", "INTERFACE", "ADDRESS", "POD", "EGRESS", "INGRESS", "BURST (E/I)", "MODE"}}
			rate := func(bps uint64) string {
				if bps == 0 {
					return "-"
				}
				return strconv.FormatFloat(float64(bps)/1e6, 'f', -1, 64) + "Mbit/s"
			}
			for _, b := range out {
				addr := ""
				if b.Address.IsValid() {
					addr = b.Address.String()
				}
				t.add(strconv.Itoa(int(b.IfIndex)), orDash(b.Interface), orDash(addr), orDash(b.Pod), rate(b.EgressBitsPerSecond),
					rate(b.IngressBitsPerSecond), orDash(b.EgressBurst)+"/"+orDash(b.IngressBurst), orDash(b.Mode))
			}
			return t
		})
	})
	return mapGroup("bandwidth", "Pod bandwidth limits (tern_bandwidth)", list)
}
