package main

import (
	"encoding/json"
	"fmt"
	"os"
)

// results is the file -json writes: the medians, for test/bench/plot to draw. Plotting
// lives in its own module so the agent's module does not carry a plotting library and its
// PDF and font dependencies (docs/benchmarks.md).
type results struct {
	Sizes    []int     `json:"sizes"`
	Fanout   int       `json:"fanout"`
	V1Fanout int       `json:"v1Fanout"`
	NoopNs   float64   `json:"noopNs"`
	Medians  []measure `json:"medians"`
}

// measure is one scenario's median over rounds.
type measure struct {
	Version  string  `json:"version"`  // v1 or v2
	Services int     `json:"services"` // Services in the datapath
	Shared   bool    `json:"shared"`   // frontends sharing backends
	Kind     string  `json:"kind"`     // fwd-est, rep-est, new, ns-fwd, ns-rep
	Ns       float64 `json:"ns"`       // median kernel ns per packet
}

var kindKeys = map[kind]string{kindFwdEst: "fwd-est", kindRepEst: "rep-est", kindNew: "new", kindNSFwd: "ns-fwd", kindNSRep: "ns-rep"}

func (b *bench) writeResults(path string) error {
	r := results{Sizes: b.p.sizes, Fanout: b.p.fanout, V1Fanout: b.p.v1Fanout, NoopNs: median(b.noop.ns)}
	for _, sc := range b.scenarios {
		if sc.s == nil {
			continue
		}
		r.Medians = append(r.Medians, measure{Version: sc.s.version, Services: sc.s.topo.services,
			Shared: sc.s.topo.fanout > 1, Kind: kindKeys[sc.kind], Ns: median(sc.ns)})
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("write the results for plotting (-json): %w", err)
	}
	return nil
}
