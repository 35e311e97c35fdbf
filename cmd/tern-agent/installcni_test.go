package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestInstallCNI installs the tern-cni next to the running binary (the test binary's
// directory holds a fake one) into a directory that already has an old plugin.
func TestInstallCNI(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(filepath.Dir(self), "tern-cni")
	want := []byte("#!fake tern-cni " + t.Name())
	if err := os.WriteFile(src, want, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(src) })
	dst := t.TempDir()
	if err := os.WriteFile(filepath.Join(dst, "tern-cni"), []byte("old"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := run(t.Context(), []string{"install-cni", dst}); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(dst, "tern-cni"))
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("installed %q, %v; want %q", got, err, want)
	}
	if st, _ := os.Stat(filepath.Join(dst, "tern-cni")); st.Mode().Perm() != 0o755 {
		t.Fatalf("mode %v, want 0755", st.Mode())
	}
	entries, _ := os.ReadDir(dst)
	if len(entries) != 1 {
		t.Fatalf("left behind %v", entries)
	}
	if err := run(t.Context(), []string{"install-cni", filepath.Join(dst, "missing")}); err == nil {
		t.Fatal("a missing directory was accepted")
	}
}
