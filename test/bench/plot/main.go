// Command plot draws docs/img/datapath.png from the medians test/bench/datapath writes with
// -json, and (-chart kubeproxy) docs/img/kubeproxy.png from test/bench/kubeproxy's. It is
// its own Go module so that the plotting library (gonum/plot, with its PDF, SVG, LaTeX and
// font dependencies) stays out of the agent's module graph.
//
//	go run . -in results.json -out ../../../docs/img/datapath.png
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"image/color"
	"os"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// results mirrors test/bench/datapath's -json file.
type results struct {
	Sizes    []int     `json:"sizes"`
	Fanout   int       `json:"fanout"`
	V1Fanout int       `json:"v1Fanout"`
	NoopNs   float64   `json:"noopNs"`
	Medians  []measure `json:"medians"`
}

type measure struct {
	Version  string  `json:"version"`
	Services int     `json:"services"`
	Shared   bool    `json:"shared"`
	Kind     string  `json:"kind"`
	Ns       float64 `json:"ns"`
}

func main() {
	in := flag.String("in", "", "the JSON file test/bench/datapath -json wrote")
	out := flag.String("out", "docs/img/datapath.png", "the PNG to draw")
	chart := flag.String("chart", "datapath", "which benchmark's JSON -in holds: datapath (test/bench/datapath) or kubeproxy (test/bench/kubeproxy)")
	flag.Parse()
	draw := run
	switch *chart {
	case "datapath":
	case "kubeproxy":
		draw = runKubeProxy
	default:
		fmt.Fprintf(os.Stderr, "plot: -chart %q: want datapath or kubeproxy\n", *chart)
		os.Exit(2)
	}
	if err := draw(*in, *out); err != nil {
		fmt.Fprintln(os.Stderr, "plot:", err)
		os.Exit(1)
	}
}

func run(in, out string) error {
	if in == "" {
		return fmt.Errorf("-in is empty: pass the file written by go run ./test/bench/datapath -json FILE")
	}
	data, err := os.ReadFile(in)
	if err != nil {
		return err
	}
	var r results
	if err := json.Unmarshal(data, &r); err != nil {
		return fmt.Errorf("%s is not test/bench/datapath's -json output: %w", in, err)
	}
	if len(r.Sizes) == 0 || len(r.Medians) == 0 {
		return fmt.Errorf("%s holds no sizes or no medians", in)
	}
	return draw(r, out)
}

func (r results) find(version string, n int, shared bool, kind string) (float64, bool) {
	for _, m := range r.Medians {
		if m.Version == version && m.Services == n && m.Shared == shared && m.Kind == kind {
			return m.Ns, true
		}
	}
	return 0, false
}

// draw plots the median ns per packet of every path for v1 and v2 at the fewest and the
// most Services, with the no-op program as a line: v1 vs v2, and flat in the number of
// Services. The shared-backend groups start at the fewest Services that can share.
func draw(r results, path string) error {
	p := plot.New()
	p.Title.Text = "pod programs: median ns per packet, cache-busting flows (BPF_PROG_TEST_RUN)"
	p.Y.Label.Text = "ns / packet"
	p.Y.Min = 0
	small, big := r.Sizes[0], r.Sizes[len(r.Sizes)-1]
	sharedSmall := big
	for _, n := range r.Sizes {
		if n >= r.Fanout {
			sharedSmall = min(sharedSmall, n)
		}
	}
	type group struct {
		label  string
		kind   string
		shared bool
	}
	groups := []group{
		{"from: established", "fwd-est", false},
		{"to: reply", "rep-est", false},
		{"from: new flow", "new", false},
		{"from: non-service", "ns-fwd", false},
		{"to: non-service", "ns-rep", false},
		{fmt.Sprintf("from: est., shared\n(v1 %d, v2 %d FE/BE)", r.V1Fanout, r.Fanout), "fwd-est", true},
		{fmt.Sprintf("to: reply, shared\n(v1 %d, v2 %d FE/BE)", r.V1Fanout, r.Fanout), "rep-est", true},
	}
	series := []struct {
		label   string
		version string
		big     bool
		c       color.RGBA
	}{
		{fmt.Sprintf("v1, %d Services (shared: %d)", small, sharedSmall), "v1", false, color.RGBA{R: 240, G: 170, B: 150, A: 255}},
		{fmt.Sprintf("v1, %d Services", big), "v1", true, color.RGBA{R: 200, G: 80, B: 60, A: 255}},
		{fmt.Sprintf("v2, %d Services (shared: %d)", small, sharedSmall), "v2", false, color.RGBA{R: 150, G: 180, B: 230, A: 255}},
		{fmt.Sprintf("v2, %d Services", big), "v2", true, color.RGBA{R: 60, G: 110, B: 190, A: 255}},
	}
	top := r.NoopNs
	w := vg.Points(13)
	for i, s := range series {
		vals := make(plotter.Values, len(groups))
		for j, g := range groups {
			n := big
			if !s.big {
				n = small
				if g.shared {
					n = sharedSmall
				}
			}
			if ns, ok := r.find(s.version, n, g.shared, g.kind); ok {
				vals[j] = ns
				top = max(top, ns)
			}
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return err
		}
		bars.Color = s.c
		bars.LineStyle.Width = 0
		bars.Offset = w * vg.Length(2*i-3) / 2
		p.Add(bars)
		p.Legend.Add(s.label, bars)
	}
	p.Y.Max = top * 1.5 // room for the legend above the bars
	line, err := plotter.NewLine(plotter.XYs{{X: -0.5, Y: r.NoopNs}, {X: float64(len(groups)) - 0.5, Y: r.NoopNs}})
	if err != nil {
		return err
	}
	line.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
	p.Add(line)
	p.Legend.Add("no-op tc program", line)
	p.Legend.Top = true
	names := make([]string, len(groups))
	for i, g := range groups {
		names[i] = g.label
	}
	p.NominalX(names...)
	return p.Save(11*vg.Inch, 5*vg.Inch, path)
}
