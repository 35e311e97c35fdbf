package docscheck

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// documentedMetrics reads docs/metrics.md's tables: each metric's type and label names.
func documentedMetrics(t *testing.T) map[string]struct {
	typ    string
	labels map[string]bool
} {
	t.Helper()
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "metrics.md"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]struct {
		typ    string
		labels map[string]bool
	}{}
	paren := regexp.MustCompile(`\([^)]*\)`)
	code := regexp.MustCompile("`([a-z_]+)`")
	for _, line := range strings.Split(string(doc), "\n") {
		if !strings.HasPrefix(line, "| `tern_") {
			continue
		}
		cols := strings.Split(line, "|")
		if len(cols) < 5 {
			continue
		}
		name := strings.Trim(strings.TrimSpace(cols[1]), "`")
		labels := map[string]bool{}
		for _, m := range code.FindAllStringSubmatch(paren.ReplaceAllString(cols[3], ""), -1) {
			labels[m[1]] = true
		}
		out[name] = struct {
			typ    string
			labels map[string]bool
		}{strings.TrimSpace(cols[2]), labels}
	}
	return out
}

type grafanaPanel struct {
	Title   string         `json:"title"`
	Panels  []grafanaPanel `json:"panels"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
}

// TestDashboardQueriesNameExportedMetrics: every query of deploy/grafana/tern-dashboard.json
// names at least one metric, every metric it names is in docs/metrics.md (which
// TestMetricsReferenceMatchesCode keeps true to the code), histogram series only for
// histograms, and every label it selects or groups by is one the metric has (or a target
// label Prometheus adds: instance, job).
func TestDashboardQueriesNameExportedMetrics(t *testing.T) {
	metrics := documentedMetrics(t)
	if len(metrics) == 0 {
		t.Fatal("no metrics found in docs/metrics.md")
	}
	b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "grafana", "tern-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels     []grafanaPanel `json:"panels"`
		Templating struct {
			List []struct {
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	type query struct{ where, expr string }
	var queries []query
	var walk func(ps []grafanaPanel)
	walk = func(ps []grafanaPanel) {
		for _, p := range ps {
			for _, tg := range p.Targets {
				queries = append(queries, query{p.Title, tg.Expr})
			}
			walk(p.Panels)
		}
	}
	walk(dash.Panels)
	for _, v := range dash.Templating.List {
		if v.Definition != "" {
			queries = append(queries, query{"variable", v.Definition})
		}
	}
	if len(queries) < 10 {
		t.Fatalf("only %d queries in the dashboard", len(queries))
	}

	name := regexp.MustCompile(`tern_[a-z_]+`)
	selector := regexp.MustCompile(`(tern_[a-z_]+)\{([^}]*)\}`)
	matcher := regexp.MustCompile(`([a-zA-Z_]+)\s*(?:=~|!~|!=|=)`)
	grouping := regexp.MustCompile(`\b(?:by|without)\s*\(([^)]*)\)`)
	target := map[string]bool{"instance": true, "job": true}
	for _, q := range queries {
		found := name.FindAllString(q.expr, -1)
		if len(found) == 0 {
			t.Errorf("%s: query %q names no tern metric", q.where, q.expr)
			continue
		}
		base := func(series string) (string, bool) {
			if _, ok := metrics[series]; ok {
				return series, true
			}
			for _, suf := range []string{"_bucket", "_sum", "_count"} {
				if b, ok := strings.CutSuffix(series, suf); ok {
					if m, ok := metrics[b]; ok && m.typ == "histogram" {
						return b, true
					}
				}
			}
			return "", false
		}
		allowed := map[string]bool{}
		for k := range target {
			allowed[k] = true
		}
		for _, series := range found {
			b, ok := base(series)
			if !ok {
				t.Errorf("%s: query %q names %s, which docs/metrics.md does not list (or not as a histogram)", q.where, q.expr, series)
				continue
			}
			for l := range metrics[b].labels {
				allowed[l] = true
			}
			if b != series {
				allowed["le"] = true
			}
		}
		for _, m := range selector.FindAllStringSubmatch(q.expr, -1) {
			b, ok := base(m[1])
			if !ok {
				continue
			}
			for _, lm := range matcher.FindAllStringSubmatch(m[2], -1) {
				if l := lm[1]; !metrics[b].labels[l] && !target[l] {
					t.Errorf("%s: query %q selects label %q, which %s does not have", q.where, q.expr, l, b)
				}
			}
		}
		for _, g := range grouping.FindAllStringSubmatch(q.expr, -1) {
			for _, l := range strings.Split(g[1], ",") {
				if l = strings.TrimSpace(l); l != "" && !allowed[l] {
					t.Errorf("%s: query %q groups by %q, a label none of its metrics has", q.where, q.expr, l)
				}
			}
		}
	}
}
