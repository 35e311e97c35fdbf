package ternctl

import (
	"net"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"github.com/vishvananda/netlink"

	"github.com/tern-net/tern/loader"
)

// Endpoint is one tern_endpoints entry: a local pod by its host veth.
type Endpoint struct {
	IfIndex   uint32     `json:"ifindex"`
	Interface string     `json:"interface,omitempty"` // the host veth's name, when it is in this namespace
	Address   netip.Addr `json:"address"`
	MAC       string     `json:"mac"`
	Pod       string     `json:"pod,omitempty"` // namespace/name, when the agent answers
	Flags     []string   `json:"flags"`         // policy, bandwidth
	Identity  uint32     `json:"identity"`
	BwSlot    uint32     `json:"bandwidthSlot"`
}

func bpfEndpointCommand(e *env) *cobra.Command {
	var pod, address string
	list := listCommand("Local pods by host veth (tern_endpoints)", func(cmd *cobra.Command) error {
		var want netip.Addr
		if pod != "" {
			a, err := e.podAddr(cmd.Context(), pod)
			if err != nil {
				return err
			}
			want = a
		} else if address != "" {
			a, err := netip.ParseAddr(address)
			if err != nil {
				return usageErr("--address %q is not an IP address", address)
			}
			want = a
		}
		m, err := e.openMaps()
		if err != nil {
			return err
		}
		defer m.Close()
		eps, err := m.DumpEndpoints()
		if err != nil {
			return withCode(ExitFailure, err)
		}
		names := e.podNames(cmd.Context())
		out := []Endpoint{}
		for k, v := range eps {
			ep := Endpoint{IfIndex: k.Ifindex, Address: loader.BEToAddr(v.Addr), MAC: net.HardwareAddr(v.Mac[:]).String(),
				Pod: names[loader.BEToAddr(v.Addr)], Flags: []string{}, Identity: v.Identity, BwSlot: v.BwSlot}
			if want.IsValid() && ep.Address != want {
				continue
			}
			if v.Flags&loader.EndpointFlagPolicy != 0 {
				ep.Flags = append(ep.Flags, "policy")
			}
			if v.Flags&loader.EndpointFlagBandwidth != 0 {
				ep.Flags = append(ep.Flags, "bandwidth")
			}
			if v.Flags&loader.EndpointFlagExclusive != 0 {
				ep.Flags = append(ep.Flags, "exclusive")
			}
			if l, err := netlink.LinkByIndex(int(k.Ifindex)); err == nil {
				ep.Interface = l.Attrs().Name
			}
			out = append(out, ep)
		}
		sort.Slice(out, func(i, j int) bool { return out[i].Address.Less(out[j].Address) })
		return e.render(out, func() *table {
			t := &table{header: []string{"IFINDEX", "INTERFACE", "ADDRESS", "MAC", "POD", "FLAGS", "IDENTITY"}}
			for _, ep := range out {
				t.add(strconv.Itoa(int(ep.IfIndex)), orDash(ep.Interface), ep.Address.String(), ep.MAC, orDash(ep.Pod),
					orDash(strings.Join(ep.Flags, ",")), strconv.Itoa(int(ep.Identity)))
			}
			return t
		})
	})
	list.Flags().StringVar(&pod, "pod", "", "only this pod (namespace/name, asked of the agent, or its address)")
	list.Flags().StringVar(&address, "address", "", "only the pod with this address")
	_ = list.RegisterFlagCompletionFunc("pod", e.completePods)
	return mapGroup("endpoint", "Local pod endpoints (tern_endpoints)", list)
}
