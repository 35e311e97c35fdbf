package ternctl

import (
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/tern-net/tern/loader"
)

// Service is one frontend of the service map with its backends in slot order.
type Service struct {
	Frontend netip.AddrPort `json:"frontend"`
	Proto    string         `json:"protocol"`
	// Type is what the frontend serves as: ClusterIP, NodePort, LoadBalancer, ExternalIP or
	// HostPort (the kind bits of svc_value.flags; "external" for an older agent's entries).
	Type string `json:"type"`
	// Scope is "all", or "internal" for the in-cluster twin of an externalTrafficPolicy
	// Local frontend (same address and port, every endpoint).
	Scope    string    `json:"scope"`
	ID       uint32    `json:"id"`
	Backends []Backend `json:"backends"`
	// MissingSlots counts backend slots the service claims but the backend map lacks (a
	// reconciler bug, or a read racing an update).
	MissingSlots int `json:"missingSlots,omitempty"`
}

// Backend is one backend slot of a Service.
type Backend struct {
	Slot    uint32         `json:"slot"`
	Address netip.AddrPort `json:"address"`
	// State is "active": the maps hold only the backends new flows may pick (terminating
	// endpoints are kept out by the agent unless none is ready).
	State string `json:"state"`
}

// ReadServices reads the service and backend maps, sorted by frontend.
func ReadServices(m *loader.Maps) ([]Service, error) {
	svcs, err := m.DumpServices()
	if err != nil {
		return nil, err
	}
	bes, err := m.DumpBackends()
	if err != nil {
		return nil, err
	}
	out := make([]Service, 0, len(svcs))
	for k, v := range svcs {
		s := Service{Frontend: ap(k.Addr, k.Port), Proto: Proto(k.Proto), Type: frontendKind(v.Flags), Scope: frontendScope(k.Scope), ID: v.Id, Backends: []Backend{}}
		for i := uint32(1); i <= uint32(v.BackendCount); i++ {
			b, ok := bes[loader.BackendKey{SvcId: v.Id, Slot: i}]
			if !ok {
				s.MissingSlots++
				continue
			}
			s.Backends = append(s.Backends, Backend{Slot: i, Address: ap(b.Addr, b.Port), State: "active"})
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool {
		if c := out[i].Frontend.Compare(out[j].Frontend); c != 0 {
			return c < 0
		}
		if out[i].Proto != out[j].Proto {
			return out[i].Proto < out[j].Proto
		}
		return out[i].Scope < out[j].Scope
	})
	return out, nil
}

// BackendAddrs are the backends' addresses in slot order.
func (s Service) BackendAddrs() []netip.AddrPort {
	out := make([]netip.AddrPort, len(s.Backends))
	for i, b := range s.Backends {
		out[i] = b.Address
	}
	return out
}

// ReadServicesAt opens the maps pinned under pinRoot and reads the services.
func ReadServicesAt(pinRoot string) ([]Service, error) {
	m, err := loader.OpenPinnedMaps(pinRoot)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	return ReadServices(m)
}

func serviceListCommand(e *env) *cobra.Command {
	return listCommand("Frontends (address:port/protocol), type and backends, from the pinned maps", func(*cobra.Command) error {
		m, err := e.openMaps()
		if err != nil {
			return err
		}
		defer m.Close()
		svcs, err := ReadServices(m)
		if err != nil {
			return withCode(ExitFailure, err)
		}
		return e.render(svcs, func() *table {
			t := &table{header: []string{"ID", "FRONTEND", "TYPE", "BACKENDS"}}
			for _, s := range svcs {
				list := make([]string, 0, len(s.Backends)+1)
				for _, b := range s.Backends {
					list = append(list, strconv.Itoa(int(b.Slot))+" => "+b.Address.String()+" ("+b.State+")")
				}
				if s.MissingSlots > 0 {
					list = append(list, "<"+strconv.Itoa(s.MissingSlots)+" slots missing>")
				}
				be := strings.Join(list, ", ")
				if be == "" {
					be = "(none: rejects)"
				}
				typ := s.Type
				if s.Scope != "all" {
					typ += " (" + s.Scope + ")"
				}
				t.add(strconv.Itoa(int(s.ID)), s.Frontend.String()+"/"+s.Proto, typ, be)
			}
			return t
		})
	})
}
