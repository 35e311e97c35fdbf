// Package docscheck keeps reference documents true to the code.
package docscheck

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// Every Prometheus metric the code defines must be described in docs/metrics.md, and the
// document must not describe metrics that no longer exist.
func TestMetricsReferenceMatchesCode(t *testing.T) {
	root := filepath.Join("..", "..")
	doc, err := os.ReadFile(filepath.Join(root, "docs", "metrics.md"))
	if err != nil {
		t.Fatal(err)
	}
	def := regexp.MustCompile(`(?:Name:\s*|NewDesc\()"(tern_[a-z_]+)"`)
	inCode := map[string]bool{}
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && path != root && (strings.HasPrefix(d.Name(), ".") || d.Name() == "test") {
			return filepath.SkipDir // test/ holds benchmarks and emulators, not the agent
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, m := range def.FindAllSubmatch(b, -1) {
			inCode[string(m[1])] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(inCode) < 10 {
		t.Fatalf("found only %d metric definitions; is the scan broken?", len(inCode))
	}
	for m := range inCode {
		if !strings.Contains(string(doc), "`"+m+"`") {
			t.Errorf("metric %s is defined in the code but not described in docs/metrics.md", m)
		}
	}
	for _, m := range regexp.MustCompile("`(tern_[a-z_]+)`").FindAllStringSubmatch(string(doc), -1) {
		if !inCode[m[1]] {
			t.Errorf("docs/metrics.md describes %s, which the code does not define", m[1])
		}
	}
}
