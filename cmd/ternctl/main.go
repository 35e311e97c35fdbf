// Command ternctl shows what tern does on a node: the service maps, the flows in
// conntrack, the datapath's counters (from the pinned maps), and the agent's IPAM state
// (from its socket). It only reads.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/loader"
)

const usage = `usage: ternctl [flags] <command>

commands:
  services   frontends (VIP:port/proto) and their backends, from the pinned maps
  flows      conntrack: client -> VIP -> backend, state and time left
  metrics    datapath counters by reason and direction
  ipam       the agent's ENIs, addresses and allocations (from its socket)

flags:
`

func main() {
	pinRoot := flag.String("pin-root", loader.DefaultPinRoot, "bpffs directory of the agent's maps")
	socket := flag.String("socket", api.DefaultSocketPath, "the agent's unix socket")
	flag.Usage = func() { fmt.Fprint(os.Stderr, usage); flag.PrintDefaults() }
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	var err error
	switch flag.Arg(0) {
	case "services", "flows", "metrics":
		err = withMaps(*pinRoot, flag.Arg(0))
	case "ipam":
		err = ipam(*socket)
	default:
		flag.Usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "ternctl:", err)
		os.Exit(1)
	}
}

func withMaps(root, cmd string) error {
	m, err := loader.OpenPinnedMaps(root)
	if err != nil {
		return err
	}
	defer m.Close()
	w := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
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

func proto(p uint8) string {
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

func ap(addr uint32, port uint16) string {
	return netip.AddrPortFrom(loader.BEToAddr(addr), loader.BEToPort(port)).String()
}

func services(w *tabwriter.Writer, m *loader.Maps) error {
	svcs, err := m.DumpServices()
	if err != nil {
		return err
	}
	bes, err := m.DumpBackends()
	if err != nil {
		return err
	}
	type row struct{ front, backends string }
	var rows []row
	for k, v := range svcs {
		var list []string
		for i := uint32(1); i <= uint32(v.BackendCount); i++ {
			b, ok := bes[loader.BackendKey{SvcId: v.Id, Slot: i}]
			if !ok {
				list = append(list, fmt.Sprintf("<slot %d missing>", i))
				continue
			}
			list = append(list, ap(b.Addr, b.Port))
		}
		be := strings.Join(list, " ")
		if be == "" {
			be = "(none: rejects)"
		}
		rows = append(rows, row{fmt.Sprintf("%s/%s", ap(k.Addr, k.Port), proto(k.Proto)), fmt.Sprintf("%d\t%s", v.Id, be)})
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].front < rows[j].front })
	fmt.Fprintln(w, "FRONTEND\tID\tBACKENDS")
	for _, r := range rows {
		fmt.Fprintf(w, "%s\t%s\n", r.front, r.backends)
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
	fmt.Fprintln(w, "PROTO\tCLIENT\tFRONTEND\tBACKEND\tSTATE\tEXPIRES IN")
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
		left := "expired"
		if v.ExpiresNs > now {
			left = time.Duration(v.ExpiresNs - now).Round(time.Second).String()
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", proto(k.Proto), ap(k.Saddr, k.Sport), ap(k.Daddr, k.Dport),
			ap(v.BackendAddr, v.BackendPort), state, left)
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

func ipam(socket string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := api.NewClient(socket, 10*time.Second).State(ctx)
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
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
