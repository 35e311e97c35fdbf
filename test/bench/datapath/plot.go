package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// plotModule is the Go module that draws the PNG. The plotting library lives there, not in
// the agent's module (docs/benchmarks.md gives the module count and binary size it saves).
const plotModule = "test/bench/plot"

// plot draws the medians into a PNG: the results go to a temporary JSON file that
// test/bench/plot (run with `go run`, from the repository root like this command) reads.
func (b *bench) plot(path string) error {
	f, err := os.CreateTemp("", "tern-datapath-*.json")
	if err != nil {
		return err
	}
	f.Close()
	defer os.Remove(f.Name())
	if err := b.writeResults(f.Name()); err != nil {
		return err
	}
	out, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	cmd := exec.Command("go", "run", ".", "-in", f.Name(), "-out", out)
	cmd.Dir = plotModule
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("draw %s with %s (run from the repository root; the results are also printed above): %w", path, plotModule, err)
	}
	return nil
}
