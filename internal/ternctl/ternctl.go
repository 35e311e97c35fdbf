// Package ternctl prints what tern does on a node: the service maps, the flows in
// conntrack and the datapath's counters (from the maps an agent pinned), and the agent's IPAM
// state (from its socket). cmd/ternctl and cmd/tern-lab print with it; it only reads.
package ternctl

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/loader"
)

// Views are the views Print knows, in the order help lists them.
func Views() []string { return []string{"services", "flows", "metrics", "ipam"} }

// Print writes one view: services, flows and metrics read the maps pinned under pinRoot,
// ipam asks the agent on socket.
func Print(ctx context.Context, w io.Writer, cmd, pinRoot, socket string) error {
	switch cmd {
	case "services", "flows", "metrics":
		return withMaps(w, pinRoot, cmd)
	case "ipam":
		return IPAM(ctx, w, socket)
	}
	return fmt.Errorf("unknown view %q (want one of %s)", cmd, strings.Join(Views(), ", "))
}

func newTable(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 2, 4, 2, ' ', 0) }

func withMaps(out io.Writer, root, cmd string) error {
	m, err := loader.OpenPinnedMaps(root)
	if err != nil {
		return err
	}
	defer m.Close()
	w := newTable(out)
	defer w.Flush()
	switch cmd {
	case "services":
		return services(w, m)
	case "flows":
		return flows(w, m)
	default:
		return metrics(w, m)
	}
}

// Proto names an IP protocol number.
func Proto(p uint8) string {
	switch p {
	case 6:
		return "TCP"
	case 17:
		return "UDP"
	case 132:
		return "SCTP"
	}
	return fmt.Sprint(p)
}

func ap(addr uint32, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(loader.BEToAddr(addr), loader.BEToPort(port))
}

// Service is one frontend of the service map with its backends in slot order.
type Service struct {
	Frontend netip.AddrPort
	Proto    string
	ID       uint32
	Backends []netip.AddrPort
	// MissingSlots counts backend slots the service claims but the backend map lacks (a
	// reconciler bug, or a read racing an update).
	MissingSlots int
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
		s := Service{Frontend: ap(k.Addr, k.Port), Proto: Proto(k.Proto), ID: v.Id}
		for i := uint32(1); i <= uint32(v.BackendCount); i++ {
			b, ok := bes[loader.BackendKey{SvcId: v.Id, Slot: i}]
			if !ok {
				s.MissingSlots++
				continue
			}
			s.Backends = append(s.Backends, ap(b.Addr, b.Port))
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool {
		if c := out[i].Frontend.Compare(out[j].Frontend); c != 0 {
			return c < 0
		}
		return out[i].Proto < out[j].Proto
	})
	return out, nil
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

func services(w *tabwriter.Writer, m *loader.Maps) error {
	svcs, err := ReadServices(m)
	if err != nil {
		return err
	}
	fmt.Fprintln(w, "FRONTEND\tID\tBACKENDS")
	for _, s := range svcs {
		list := make([]string, 0, len(s.Backends)+1)
		for _, b := range s.Backends {
			list = append(list, b.String())
		}
		if s.MissingSlots > 0 {
			list = append(list, fmt.Sprintf("<%d slots missing>", s.MissingSlots))
		}
		be := strings.Join(list, " ")
		if be == "" {
			be = "(none: rejects)"
		}
		fmt.Fprintf(w, "%s/%s\t%d\t%s\n", s.Frontend, s.Proto, s.ID, be)
	}
	return nil
}

func flows(w *tabwriter.Writer, m *loader.Maps) error {
	ct, err := m.DumpCT()
	if err != nil {
		return err
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return err
	}
	now := uint64(ts.Nano())
	type row struct {
		key  string
		line string
	}
	rows := make([]row, 0, len(ct))
	for k, v := range ct {
		state := "new"
		if v.Flags&loader.CTFlagSeenReply != 0 {
			state = "established"
		}
		if v.Flags&loader.CTFlagClosing != 0 {
			state = "closing"
		}
		if v.Flags&loader.CTFlagHairpin != 0 {
			state += ",hairpin"
		}
		if v.Flags&loader.CTFlagPortSNAT != 0 {
			state += ",port-snat"
		}
		left := "expired"
		if v.ExpiresNs > now {
			left = time.Duration(v.ExpiresNs - now).Round(time.Second).String()
		}
		a, b := ap(k.AddrA, k.PortA), ap(k.AddrB, k.PortB)
		// From the side that opened the flow to the other.
		kind, from, to, via := "flow", a.String(), b.String(), "-"
		if v.Flags&loader.CTFlagOriginB != 0 {
			from, to = to, from
		}
		switch {
		case v.Flags&loader.CTFlagSvc != 0:
			// What the client sent, and where its flow goes on the wire.
			kind = "service"
			via = fmt.Sprintf("to backend %s (source port %d)", ap(v.NatAddr, v.NatPort), loader.BEToPort(v.NatSport))
		case v.Flags&loader.CTFlagRevNAT != 0:
			via = fmt.Sprintf("replies from %s to port %d", ap(v.NatAddr, v.NatPort), loader.BEToPort(v.NatSport))
		}
		rows = append(rows, row{kind + from, fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s\t%s", kind, Proto(k.Proto), from, to, via, state, left)})
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].key < rows[j].key })
	fmt.Fprintln(w, "KIND\tPROTO\tFROM\tTO\tTRANSLATION\tSTATE\tEXPIRES IN")
	for _, r := range rows {
		fmt.Fprintln(w, r.line)
	}
	return nil
}

func metrics(w *tabwriter.Writer, m *loader.Maps) error {
	tot, err := m.MetricsTotals()
	if err != nil {
		return err
	}
	keys := make([]loader.MetricsKey, 0, len(tot))
	for k := range tot {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].Dir != keys[j].Dir {
			return keys[i].Dir < keys[j].Dir
		}
		return keys[i].Reason < keys[j].Reason
	})
	fmt.Fprintln(w, "DIRECTION\tREASON\tPACKETS\tBYTES")
	for _, k := range keys {
		fmt.Fprintf(w, "%s\t%s\t%d\t%d\n", k.Dir, k.Reason, tot[k].Packets, tot[k].Bytes)
	}
	return nil
}

// IPAM prints the agent's ENIs, addresses and allocations, asked on its socket.
func IPAM(ctx context.Context, out io.Writer, socket string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := api.NewClient(socket, 10*time.Second).State(ctx)
	if err != nil {
		return err
	}
	w := newTable(out)
	defer w.Flush()
	fmt.Fprintf(w, "node %s (instance %s): %d addresses in use, %d idle, at most %d pods\n\n",
		st.NodeName, st.InstanceID, st.InUse, st.Idle, st.MaxPods)
	fmt.Fprintln(w, "ENI\tMAC\tADDRESSES\tIN USE")
	for _, e := range st.ENIs {
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\n", e.ID, e.MAC, len(e.IPs), strings.Join(e.InUse, " "))
	}
	fmt.Fprintln(w, "\nPOD\tIP\tENI")
	keys := make([]string, 0, len(st.Allocations))
	for k := range st.Allocations {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		a := st.Allocations[k]
		fmt.Fprintf(w, "%s\t%s\t%s\n", k, a.IP, a.ENI.ID)
	}
	return nil
}
