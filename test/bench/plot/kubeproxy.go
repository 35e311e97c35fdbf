package main

import (
	"encoding/json"
	"fmt"
	"image/color"
	"os"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// kubeProxyResults mirrors the part of test/bench/kubeproxy's -json file the chart needs.
type kubeProxyResults struct {
	Sizes []struct {
		Services int `json:"services"`
	} `json:"sizes"`
	Medians []struct {
		Path     string  `json:"path"`
		Kind     string  `json:"kind"`
		Datapath string  `json:"datapath"`
		Services int     `json:"services"`
		Value    float64 `json:"value"`
	} `json:"medians"`
}

func (r kubeProxyResults) find(path, kind, dp string, n int) (float64, bool) {
	for _, m := range r.Medians {
		if m.Path == path && m.Kind == kind && m.Datapath == dp && m.Services == n {
			return m.Value, true
		}
	}
	return 0, false
}

func runKubeProxy(in, out string) error {
	data, err := os.ReadFile(in)
	if err != nil {
		return err
	}
	var r kubeProxyResults
	if err := json.Unmarshal(data, &r); err != nil {
		return fmt.Errorf("%s is not test/bench/kubeproxy's -json output: %w", in, err)
	}
	if len(r.Sizes) == 0 || len(r.Medians) == 0 {
		return fmt.Errorf("%s holds no sizes or no medians", in)
	}
	return drawKubeProxy(r, out)
}

// drawKubeProxy plots every proxy's median as a ratio of the no-Service median of the same
// measurement (one axis for conn/s, req/s and Gbit/s), at the fewest and the most Services,
// with 1.0 (no Service) as a line.
func drawKubeProxy(r kubeProxyResults, path string) error {
	p := plot.New()
	p.Title.Text = "Service datapaths: median / no-Service median (higher is better)"
	p.Y.Label.Text = "ratio to no Service"
	p.Y.Min = 0
	small, big := r.Sizes[0].Services, r.Sizes[len(r.Sizes)-1].Services
	groups := []struct{ label, path, kind string }{
		{"ClusterIP\nnew conn/s", "clusterip", "conn"},
		{"ClusterIP\nkept-alive req/s", "clusterip", "rr"},
		{"ClusterIP\nGbit/s", "clusterip", "stream"},
		{"NodePort\nnew conn/s", "nodeport", "conn"},
		{"NodePort\nkept-alive req/s", "nodeport", "rr"},
		{"NodePort\nGbit/s", "nodeport", "stream"},
	}
	series := []struct {
		label, dp string
		n         int
		c         color.RGBA
	}{
		{fmt.Sprintf("kube-proxy iptables, %d", small), "iptables", small, color.RGBA{R: 240, G: 170, B: 150, A: 255}},
		{fmt.Sprintf("kube-proxy iptables, %d", big), "iptables", big, color.RGBA{R: 200, G: 80, B: 60, A: 255}},
		{fmt.Sprintf("kube-proxy nftables, %d", small), "nftables", small, color.RGBA{R: 240, G: 210, B: 140, A: 255}},
		{fmt.Sprintf("kube-proxy nftables, %d", big), "nftables", big, color.RGBA{R: 200, G: 150, B: 30, A: 255}},
		{fmt.Sprintf("tern, %d Services", small), "tern", small, color.RGBA{R: 150, G: 180, B: 230, A: 255}},
		{fmt.Sprintf("tern, %d Services", big), "tern", big, color.RGBA{R: 60, G: 110, B: 190, A: 255}},
	}
	w := vg.Points(10)
	top := 1.0
	for i, s := range series {
		vals := make(plotter.Values, len(groups))
		for j, g := range groups {
			v, ok1 := r.find(g.path, g.kind, s.dp, s.n)
			base, ok2 := r.find(g.path, g.kind, "none", s.n)
			if ok1 && ok2 && base > 0 {
				vals[j] = v / base
				top = max(top, vals[j])
			}
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return err
		}
		bars.Color = s.c
		bars.LineStyle.Width = 0
		bars.Offset = w * vg.Length(2*i-len(series)+1) / 2
		p.Add(bars)
		p.Legend.Add(s.label, bars)
	}
	p.Y.Max = top * 1.6 // room for the legend above the bars
	line, err := plotter.NewLine(plotter.XYs{{X: -0.5, Y: 1}, {X: float64(len(groups)) - 0.5, Y: 1}})
	if err != nil {
		return err
	}
	line.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
	p.Add(line)
	p.Legend.Add("no Service (pod IPs)", line)
	p.Legend.Top = true
	names := make([]string, len(groups))
	for i, g := range groups {
		names[i] = g.label
	}
	p.NominalX(names...)
	return p.Save(11*vg.Inch, 5*vg.Inch, path)
}
