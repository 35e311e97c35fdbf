package ternctl

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/loader"
)

// Flow is one tern_conntrack entry, told from the side that opened it.
type Flow struct {
	Kind  string         `json:"kind"` // service (client→frontend), revnat (its wire side), flow
	Proto string         `json:"protocol"`
	From  netip.AddrPort `json:"from"`
	To    netip.AddrPort `json:"to"`
	// Translation: for a service entry the backend it goes to and the source port on the
	// wire; for a revnat entry the frontend replies are rewritten to.
	NATAddress netip.AddrPort `json:"natAddress,omitzero"`
	NATSport   uint16         `json:"natSourcePort,omitempty"`
	ServiceID  uint32         `json:"serviceID,omitempty"`
	State      string         `json:"state"` // new, established, closing
	Flags      []string       `json:"flags"` // hairpin, port-snat
	// ExpiresInSeconds is 0 for an expired entry the LRU has not evicted yet.
	ExpiresInSeconds int64 `json:"expiresInSeconds"`
}

type flowFilter struct {
	address string
	port    uint16
	pod     string
	proto   string
}

func (f flowFilter) match(fl Flow, addr netip.Addr) bool {
	if addr.IsValid() {
		if fl.From.Addr() != addr && fl.To.Addr() != addr && fl.NATAddress.Addr() != addr {
			return false
		}
	}
	if f.port != 0 && fl.From.Port() != f.port && fl.To.Port() != f.port && fl.NATAddress.Port() != f.port {
		return false
	}
	if f.proto != "" && !strings.EqualFold(f.proto, fl.Proto) {
		return false
	}
	return true
}

func bpfCTCommand(e *env) *cobra.Command {
	var f flowFilter
	list := listCommand("Conntrack: flows, their translation, state and time left", func(cmd *cobra.Command) error {
		var addr netip.Addr
		switch {
		case f.pod != "" && f.address != "":
			return usageErr("--pod and --address both name an address: give one")
		case f.pod != "":
			a, err := e.podAddr(cmd.Context(), f.pod)
			if err != nil {
				return err
			}
			addr = a
		case f.address != "":
			a, err := netip.ParseAddr(f.address)
			if err != nil {
				return usageErr("--address %q is not an IP address", f.address)
			}
			addr = a
		}
		m, err := e.openMaps()
		if err != nil {
			return err
		}
		defer m.Close()
		all, err := ReadFlows(m)
		if err != nil {
			return withCode(ExitFailure, err)
		}
		flows := []Flow{}
		for _, fl := range all {
			if f.match(fl, addr) {
				flows = append(flows, fl)
			}
		}
		return e.render(flows, func() *table {
			t := &table{header: []string{"KIND", "PROTO", "FROM", "TO", "TRANSLATION", "STATE", "EXPIRES IN"}}
			for _, fl := range flows {
				via := "-"
				switch fl.Kind {
				case "service":
					via = fmt.Sprintf("to backend %s (source port %d)", fl.NATAddress, fl.NATSport)
				case "revnat":
					via = fmt.Sprintf("replies from %s to port %d", fl.NATAddress, fl.NATSport)
				}
				state := fl.State
				if len(fl.Flags) > 0 {
					state += "," + strings.Join(fl.Flags, ",")
				}
				left := "expired"
				if fl.ExpiresInSeconds > 0 {
					left = (time.Duration(fl.ExpiresInSeconds) * time.Second).String()
				}
				t.add(fl.Kind, fl.Proto, fl.From.String(), fl.To.String(), via, state, left)
			}
			return t
		})
	})
	fl := list.Flags()
	fl.StringVar(&f.address, "address", "", "only flows with this address on either side or in the translation")
	fl.Uint16Var(&f.port, "port", 0, "only flows with this port on either side or in the translation")
	fl.StringVar(&f.pod, "pod", "", "only flows of this pod (namespace/name, asked of the agent, or its address)")
	fl.StringVar(&f.proto, "protocol", "", "only flows of this protocol (TCP, UDP, SCTP, ICMP)")
	_ = list.RegisterFlagCompletionFunc("protocol", cobra.FixedCompletions([]string{"TCP", "UDP", "SCTP", "ICMP"}, cobra.ShellCompDirectiveNoFileComp))
	_ = list.RegisterFlagCompletionFunc("pod", e.completePods)
	return mapGroup("ct", "Connection tracking (tern_conntrack)", list)
}

// ReadFlows reads the conntrack map, sorted by kind and origin.
func ReadFlows(m *loader.Maps) ([]Flow, error) {
	ct, err := m.DumpCT()
	if err != nil {
		return nil, err
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return nil, fmt.Errorf("read the monotonic clock: %w", err)
	}
	now := uint64(ts.Nano())
	out := make([]Flow, 0, len(ct))
	for k, v := range ct {
		fl := Flow{Kind: "flow", Proto: Proto(k.Proto), State: "new", Flags: []string{}, ServiceID: v.SvcId}
		if v.Flags&loader.CTFlagSeenReply != 0 {
			fl.State = "established"
		}
		if v.Flags&loader.CTFlagClosing != 0 {
			fl.State = "closing"
		}
		if v.Flags&loader.CTFlagHairpin != 0 {
			fl.Flags = append(fl.Flags, "hairpin")
		}
		if v.Flags&loader.CTFlagPortSNAT != 0 {
			fl.Flags = append(fl.Flags, "port-snat")
		}
		if v.ExpiresNs > now {
			fl.ExpiresInSeconds = int64(time.Duration(v.ExpiresNs-now).Round(time.Second) / time.Second)
		}
		// From the side that opened the flow to the other.
		fl.From, fl.To = ap(k.AddrA, k.PortA), ap(k.AddrB, k.PortB)
		if v.Flags&loader.CTFlagOriginB != 0 {
			fl.From, fl.To = fl.To, fl.From
		}
		switch {
		case v.Flags&loader.CTFlagSvc != 0:
			fl.Kind = "service"
		case v.Flags&loader.CTFlagRevNAT != 0:
			fl.Kind = "revnat"
		}
		if fl.Kind != "flow" {
			fl.NATAddress, fl.NATSport = ap(v.NatAddr, v.NatPort), loader.BEToPort(v.NatSport)
		}
		out = append(out, fl)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Kind != b.Kind {
			return a.Kind > b.Kind // service first, then revnat, then plain flows
		}
		if c := a.From.Compare(b.From); c != 0 {
			return c < 0
		}
		return a.To.Compare(b.To) < 0
	})
	return out, nil
}
