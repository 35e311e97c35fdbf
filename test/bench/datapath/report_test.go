package main

import (
	"strings"
	"testing"
)

// The targets are judged on the median over setups, not on any single setup.
func TestReportAcrossSetupsJudgesTheMedian(t *testing.T) {
	rs := func(v float64) []ratio {
		return []ratio{{what: "reply / forward", own: v, target: 1.0, judged: true, available: true}}
	}
	var b strings.Builder
	reportAcrossSetups(&b, [][]ratio{rs(1.2), rs(0.9), rs(0.95)})
	if !strings.Contains(b.String(), "| reply / forward | 1.200 | 0.900 | 0.950 | 0.950 | ≤ 1.0 | met |") {
		t.Fatalf("median 0.95 of (1.2, 0.9, 0.95) should be met:\n%s", b.String())
	}
	b.Reset()
	reportAcrossSetups(&b, [][]ratio{rs(1.2), rs(0.9), rs(1.1)})
	if !strings.Contains(b.String(), "| 1.100 | ≤ 1.0 | **missed by 10%** |") {
		t.Fatalf("median 1.1 should be missed by 10%%:\n%s", b.String())
	}
}
