package main

import (
	"fmt"
	"image/color"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// writePlot draws the median ns/packet per scenario, grouped by the number of Services, with
// the no-op program as a line: the picture of "flat in the number of Services".
func writePlot(path string, sizes []int, med map[string]float64, noop float64) error {
	p := plot.New()
	p.Title.Text = "tern_from_pod: median ns per packet (BPF_PROG_TEST_RUN)"
	p.Y.Label.Text = "ns / packet"
	p.Y.Min = 0
	names := make([]string, len(sizes))
	for i, n := range sizes {
		names[i] = fmt.Sprintf("%d Services", n)
	}
	kinds := []struct {
		label string
		c     color.RGBA
	}{
		{"new flow", color.RGBA{R: 200, G: 80, B: 60, A: 255}},
		{"established flow", color.RGBA{R: 60, G: 110, B: 190, A: 255}},
		{"non-service packet", color.RGBA{R: 120, G: 160, B: 90, A: 255}},
	}
	w := vg.Points(22)
	top := noop
	for _, v := range med {
		top = max(top, v)
	}
	p.Y.Max = top * 1.45 // room for the legend above the bars
	for i, k := range kinds {
		vals := make(plotter.Values, len(sizes))
		for j, n := range sizes {
			vals[j] = med[fmt.Sprintf("%s, %d services", k.label, n)]
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return err
		}
		bars.Color = k.c
		bars.LineStyle.Width = 0
		bars.Offset = w * vg.Length(i-1)
		p.Add(bars)
		p.Legend.Add(k.label, bars)
	}
	line, err := plotter.NewLine(plotter.XYs{{X: -0.5, Y: noop}, {X: float64(len(sizes)) - 0.5, Y: noop}})
	if err != nil {
		return err
	}
	line.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
	p.Add(line)
	p.Legend.Add("no-op tc program", line)
	p.Legend.Top = true
	p.NominalX(names...)
	return p.Save(7*vg.Inch, 4*vg.Inch, path)
}
