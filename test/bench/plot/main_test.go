package main

import (
	"image/png"
	"os"
	"path/filepath"
	"testing"
)

// TestDrawsTheCommittedSample draws a results file of the shape test/bench/datapath -json
// writes (a small run) and checks a PNG of the chosen size comes out.
func TestDrawsTheCommittedSample(t *testing.T) {
	out := filepath.Join(t.TempDir(), "datapath.png")
	if err := run("testdata/results.json", out); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("%s is not a PNG: %v", out, err)
	}
	if b := img.Bounds(); b.Dx() < 500 || b.Dy() < 200 {
		t.Fatalf("image is %v, want about 11x5 inches", b)
	}
	if err := run("main.go", out); err == nil {
		t.Fatal("a file that is not the benchmark's JSON was accepted")
	}
}

// TestDrawsTheKubeProxySample draws a file of the shape test/bench/kubeproxy -json writes.
func TestDrawsTheKubeProxySample(t *testing.T) {
	out := filepath.Join(t.TempDir(), "kubeproxy.png")
	if err := runKubeProxy("testdata/kubeproxy.json", out); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("%s is not a PNG: %v", out, err)
	}
	if b := img.Bounds(); b.Dx() < 500 || b.Dy() < 200 {
		t.Fatalf("image is %v, want about 11x5 inches", b)
	}
	if err := runKubeProxy("testdata/results.json", out); err == nil {
		t.Fatal("test/bench/datapath's JSON was accepted as test/bench/kubeproxy's")
	}
}
