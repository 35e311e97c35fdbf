//go:build linux

package main

import (
	"flag"
	"io"
	"reflect"
	"testing"
)

func TestParseArgsInterspersed(t *testing.T) {
	for _, tc := range []struct {
		args  []string
		pos   []string
		count int
	}{
		{[]string{"client", "10.96.0.10:80", "-count", "5"}, []string{"client", "10.96.0.10:80"}, 5},
		{[]string{"-count", "3", "client", "10.96.0.10:80"}, []string{"client", "10.96.0.10:80"}, 3},
		{[]string{"client", "--", "ip", "-count", "7"}, []string{"client", "--", "ip", "-count", "7"}, 1},
		{[]string{"-count", "2", "node-1", "--", "ss", "-ltn"}, []string{"node-1", "--", "ss", "-ltn"}, 2},
	} {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		count := fs.Int("count", 1, "")
		pos, err := parseArgs(fs, tc.args)
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if !reflect.DeepEqual(pos, tc.pos) || *count != tc.count {
			t.Errorf("%v: positional %v count %d, want %v %d", tc.args, pos, *count, tc.pos, tc.count)
		}
	}
}

func TestSplitPod(t *testing.T) {
	if ns, n := splitPod("demo/web-0", "default"); ns != "demo" || n != "web-0" {
		t.Errorf("got %s %s", ns, n)
	}
	if ns, n := splitPod("web-0", "x"); ns != "x" || n != "web-0" {
		t.Errorf("got %s %s", ns, n)
	}
}
