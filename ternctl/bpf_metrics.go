package ternctl

import (
	"sort"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/tern-net/tern/loader"
)

// Metric is one datapath counter summed over CPUs.
type Metric struct {
	Direction string `json:"direction"`
	Reason    string `json:"reason"`
	Drop      bool   `json:"drop"`
	Packets   uint64 `json:"packets"`
	Bytes     uint64 `json:"bytes"`
}

func bpfMetricsCommand(e *env) *cobra.Command {
	var dropsOnly bool
	list := listCommand("Datapath counters by direction and reason (drops and forwarding outcomes)", func(*cobra.Command) error {
		m, err := e.openMaps()
		if err != nil {
			return err
		}
		defer m.Close()
		tot, err := m.MetricsTotals()
		if err != nil {
			return withCode(ExitFailure, err)
		}
		keys := make([]loader.MetricsKey, 0, len(tot))
		for k := range tot {
			if dropsOnly && !k.Reason.IsDrop() {
				continue
			}
			keys = append(keys, k)
		}
		sort.Slice(keys, func(i, j int) bool {
			if keys[i].Dir != keys[j].Dir {
				return keys[i].Dir < keys[j].Dir
			}
			return keys[i].Reason < keys[j].Reason
		})
		out := make([]Metric, 0, len(keys))
		for _, k := range keys {
			out = append(out, Metric{Direction: k.Dir.String(), Reason: k.Reason.String(), Drop: k.Reason.IsDrop(),
				Packets: tot[k].Packets, Bytes: tot[k].Bytes})
		}
		return e.render(out, func() *table {
			t := &table{header: []string{"DIRECTION", "REASON", "PACKETS", "BYTES"}}
			for _, x := range out {
				t.add(x.Direction, x.Reason, strconv.FormatUint(x.Packets, 10), strconv.FormatUint(x.Bytes, 10))
			}
			return t
		})
	})
	list.Flags().BoolVar(&dropsOnly, "drops", false, "only drop reasons")
	return mapGroup("metrics", "Datapath counters (tern_metrics)", list)
}
