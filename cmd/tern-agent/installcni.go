package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// installCNI copies the tern-cni binary next to this one into dir, the container runtime's
// plugin directory: written to a temporary name, synced, then renamed over the old one, so a
// runtime that runs the plugin meanwhile never executes a half-written file. It is the
// DaemonSet's init container: the image has no shell, so no cp/mv script.
func installCNI(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: tern-agent install-cni DIR (the runtime's CNI plugin directory, e.g. /host/opt/cni/bin)")
	}
	dir := args[0]
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("install-cni: find this binary: %w", err)
	}
	src := filepath.Join(filepath.Dir(self), "tern-cni")
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("install-cni: %w (tern-cni ships next to tern-agent in the image)", err)
	}
	defer in.Close()
	tmp := filepath.Join(dir, ".tern-cni.new")
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return fmt.Errorf("install-cni: %w (is the host's CNI bin directory mounted at %s?)", err, dir)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		os.Remove(tmp)
		return fmt.Errorf("install-cni: copy %s to %s: %w", src, tmp, err)
	}
	if err := out.Sync(); err != nil {
		out.Close()
		os.Remove(tmp)
		return fmt.Errorf("install-cni: sync %s: %w", tmp, err)
	}
	if err := out.Close(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("install-cni: %w", err)
	}
	// The umask may have narrowed the mode; the runtime must be able to run it.
	if err := os.Chmod(tmp, 0o755); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("install-cni: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "tern-cni")); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("install-cni: %w", err)
	}
	return nil
}
