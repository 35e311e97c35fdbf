package main

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/layout"
)

// TestImageIsReproducible builds the image twice from this tree into two OCI layouts and
// checks: the digests are equal; the one layer holds exactly the three binaries (0755,
// owned by root, at the fixed time) and their directories; the agent binary carries every
// BPF object it loads, byte for byte (bpf2go embeds loader/*_bpfel.o); the layout on disk
// is the image that was built.
func TestImageIsReproducible(t *testing.T) {
	epoch := time.Unix(1700000000, 0).UTC()
	var digests []string
	dirs := []string{filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")}
	for _, dir := range dirs {
		img, err := build(options{repo: "../..", tag: "tern:test", epoch: epoch, arch: "amd64", oci: dir})
		if err != nil {
			t.Fatal(err)
		}
		if err := write(img, options{tag: "tern:test", oci: dir}); err != nil {
			t.Fatal(err)
		}
		d, err := img.Digest()
		if err != nil {
			t.Fatal(err)
		}
		digests = append(digests, d.String())
	}
	if digests[0] != digests[1] {
		t.Fatalf("two builds of one tree differ: %s vs %s", digests[0], digests[1])
	}
	t.Logf("image digest %s (both builds)", digests[0])

	// Read the image back from the layout, as a runtime importing it would.
	p, err := layout.FromPath(dirs[1])
	if err != nil {
		t.Fatal(err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Manifests) != 1 || m.Manifests[0].Digest.String() != digests[0] ||
		m.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != "tern:test" {
		t.Fatalf("layout index %+v; want the one image %s named tern:test", m.Manifests, digests[0])
	}
	img, err := idx.Image(m.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if !cf.Created.Time.Equal(epoch) || !slices.Equal(cf.Config.Entrypoint, []string{"/usr/local/bin/tern-agent"}) || cf.OS != "linux" {
		t.Errorf("config: created %v, entrypoint %v, os %s", cf.Created, cf.Config.Entrypoint, cf.OS)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("%d layers, %v; want 1", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	var names []string
	files := map[string][]byte{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if h.Uid != 0 || h.Gid != 0 || !h.ModTime.Equal(epoch) || h.Mode&0o777 != 0o755 {
			t.Errorf("%s: uid %d gid %d mtime %v mode %o", h.Name, h.Uid, h.Gid, h.ModTime, h.Mode)
		}
		if h.Typeflag == tar.TypeReg {
			data, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			files[h.Name] = data
			t.Logf("%s %d bytes", h.Name, len(data))
		}
	}
	want := []string{"usr/", "usr/local/", "usr/local/bin/", "usr/local/bin/tern-agent", "usr/local/bin/tern-cni", "usr/local/bin/ternctl"}
	if !slices.Equal(names, want) {
		t.Fatalf("layer holds %v; want %v", names, want)
	}
	for _, f := range want[3:] {
		if !bytes.HasPrefix(files[f], []byte("\x7fELF")) {
			t.Errorf("%s is not an ELF binary", f)
		}
	}

	// The objects the agent loads are inside it. noop is the benchmarks' baseline program,
	// which the agent never loads, so the linker leaves it out.
	objs, err := filepath.Glob("../../loader/*_bpfel.o")
	if err != nil || len(objs) == 0 {
		t.Fatalf("no BPF objects in ../../loader: %v", err)
	}
	agent := files["usr/local/bin/tern-agent"]
	for _, o := range objs {
		data, err := os.ReadFile(o)
		if err != nil {
			t.Fatal(err)
		}
		in := bytes.Contains(agent, data)
		switch {
		case filepath.Base(o) == "noop_bpfel.o":
			if in {
				t.Logf("%s is in the agent too", o)
			}
		case !in:
			t.Errorf("the agent binary in the image does not embed %s (%d bytes)", o, len(data))
		default:
			t.Logf("tern-agent embeds %s (%d bytes)", filepath.Base(o), len(data))
		}
	}
}
