package ternctl

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/service"
)

// LBEntry is one entry of the load-balancer maps as stored: a tern_services entry (Slot 0)
// or a tern_backends slot of it, with the membership index's slot for that backend.
type LBEntry struct {
	Map       string         `json:"map"`
	ServiceID uint32         `json:"serviceID"`
	Frontend  netip.AddrPort `json:"frontend,omitzero"`
	Proto     string         `json:"protocol,omitempty"`
	Slots     uint16         `json:"backendCount,omitempty"`
	Flags     uint16         `json:"flags,omitempty"`
	// Kind is the part of a Service the frontend comes from (ClusterIP, NodePort,
	// LoadBalancer, ExternalIP) or HostPort, from the flags' kind bits; "external" for an
	// external frontend an older agent wrote without them.
	Kind string `json:"kind,omitempty"`
	// Scope is svc_key.scope: "all", or "internal" for the in-cluster twin of an
	// externalTrafficPolicy Local frontend (every endpoint, for pods and host processes).
	Scope   string         `json:"scope,omitempty"`
	Slot    uint32         `json:"slot,omitempty"`
	Backend netip.AddrPort `json:"backend,omitzero"`
	// MemberSlot is the slot tern_lb_members gives this backend (0 when missing: the
	// reconciler's index disagrees with the slots).
	MemberSlot uint32 `json:"memberSlot,omitempty"`
}

func bpfLBCommand(e *env) *cobra.Command {
	list := listCommand("tern_services, tern_backends and tern_lb_members, entry by entry", func(*cobra.Command) error {
		m, err := e.openMaps()
		if err != nil {
			return err
		}
		defer m.Close()
		entries, err := readLB(m)
		if err != nil {
			return withCode(ExitFailure, err)
		}
		return e.render(entries, func() *table {
			t := &table{header: []string{"MAP", "SERVICE", "FRONTEND", "KIND", "SCOPE", "SLOT", "BACKEND", "MEMBER SLOT"}}
			for _, x := range entries {
				if x.Map == loader.PodMapTernServices {
					t.add(x.Map, strconv.Itoa(int(x.ServiceID)), x.Frontend.String()+"/"+x.Proto, x.Kind, x.Scope,
						strconv.Itoa(int(x.Slots))+" backends", "-", "-")
					continue
				}
				t.add(x.Map, strconv.Itoa(int(x.ServiceID)), "-", "-", "-", strconv.Itoa(int(x.Slot)), x.Backend.String(), strconv.Itoa(int(x.MemberSlot)))
			}
			return t
		})
	})
	return mapGroup("lb", "Service load-balancing maps", list)
}

func readLB(m *loader.Maps) ([]LBEntry, error) {
	svcs, err := m.DumpServices()
	if err != nil {
		return nil, err
	}
	bes, err := m.DumpBackends()
	if err != nil {
		return nil, err
	}
	members, err := m.DumpMembers()
	if err != nil {
		return nil, err
	}
	out := make([]LBEntry, 0, len(svcs)+len(bes))
	for k, v := range svcs {
		out = append(out, LBEntry{Map: loader.PodMapTernServices, ServiceID: v.Id, Frontend: ap(k.Addr, k.Port),
			Proto: Proto(k.Proto), Slots: v.BackendCount, Flags: v.Flags, Kind: frontendKind(v.Flags), Scope: frontendScope(k.Scope)})
	}
	for k, v := range bes {
		mk := loader.MemberKey{SvcId: k.SvcId, Addr: v.Addr, Port: v.Port}
		out = append(out, LBEntry{Map: loader.PodMapTernBackends, ServiceID: k.SvcId, Slot: k.Slot,
			Backend: ap(v.Addr, v.Port), MemberSlot: members[mk]})
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.ServiceID != b.ServiceID {
			return a.ServiceID < b.ServiceID
		}
		if a.Map != b.Map {
			return a.Map == loader.PodMapTernServices
		}
		if c := a.Frontend.Compare(b.Frontend); c != 0 {
			return c < 0
		}
		return a.Slot < b.Slot
	})
	return out, nil
}

// frontendKind reads the kind bits the service reconciler writes into svc_value.flags.
func frontendKind(flags uint16) string {
	k := service.Kind((flags & loader.SvcKindMask) >> loader.SvcKindShift)
	if k == service.KindClusterIP && flags&loader.SvcFlagExternal != 0 {
		return "external" // written by an agent from before the kind bits
	}
	return k.String()
}

// frontendScope names svc_key.scope.
func frontendScope(scope uint8) string {
	switch scope {
	case 0:
		return "all"
	case loader.SvcScopeInternal:
		return "internal"
	}
	return fmt.Sprintf("scope-%d", scope)
}
