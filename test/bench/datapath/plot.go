package main

import (
	"fmt"
	"image/color"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// plot draws the median ns per packet of every path for v1 and v2 at the fewest and the
// most Services, with the no-op program as a line: v1 vs v2, and flat in the number of
// Services. The shared-backend groups start at the fewest Services that can share.
func (b *bench) plot(path string) error {
	p := plot.New()
	p.Title.Text = "pod programs: median ns per packet, cache-busting flows (BPF_PROG_TEST_RUN)"
	p.Y.Label.Text = "ns / packet"
	p.Y.Min = 0
	small, big := b.p.sizes[0], b.p.sizes[len(b.p.sizes)-1]
	sharedSmall := big
	for _, n := range b.p.sizes {
		if n >= b.p.fanout {
			sharedSmall = min(sharedSmall, n)
		}
	}
	type group struct {
		label  string
		k      kind
		shared bool
	}
	groups := []group{
		{"from: established", kindFwdEst, false},
		{"to: reply", kindRepEst, false},
		{"from: new flow", kindNew, false},
		{"from: non-service", kindNSFwd, false},
		{"to: non-service", kindNSRep, false},
		{fmt.Sprintf("from: est., shared\n(v1 %d, v2 %d FE/BE)", b.p.v1Fanout, b.p.fanout), kindFwdEst, true},
		{fmt.Sprintf("to: reply, shared\n(v1 %d, v2 %d FE/BE)", b.p.v1Fanout, b.p.fanout), kindRepEst, true},
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
	noop := median(b.noop.ns)
	top := noop
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
			if sc := b.find(s.version, n, g.shared, g.k); sc != nil {
				vals[j] = median(sc.ns)
				top = max(top, vals[j])
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
	line, err := plotter.NewLine(plotter.XYs{{X: -0.5, Y: noop}, {X: float64(len(groups)) - 0.5, Y: noop}})
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
