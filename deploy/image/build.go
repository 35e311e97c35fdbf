// Command image builds tern's container image without a Docker daemon: the three static
// binaries (tern-agent, tern-cni, ternctl; CGO off, the BPF objects embedded in the agent by
// bpf2go) in one layer on an empty base, written as an OCI image layout directory and, if
// asked, a tarball `docker load` and `ctr images import` accept.
//
// The build is reproducible: the binaries are built with -trimpath, no VCS stamp and an
// empty build ID; the layer's entries are sorted, owned by 0:0 and stamped with one fixed
// time (SOURCE_DATE_EPOCH, default 0), as are the image's created time and history. Two
// builds of the same tree give the same digest (TestImageIsReproducible).
//
// It is a Go module of its own so that go-containerregistry stays out of the agent's module.
//
//	cd deploy/image && go run . -out ../../bin/image/oci -tar ../../bin/image/tern.tar
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// binaries are the commands in the image, all under /usr/local/bin (the DaemonSet runs
// /usr/local/bin/tern-agent; install-cni copies the tern-cni beside it).
var binaries = []string{"tern-agent", "tern-cni", "ternctl"}

const binDir = "usr/local/bin"

// options of one build.
type options struct {
	repo   string    // repository root (holds go.mod and cmd/)
	tag    string    // image reference written into the layout and tarball
	epoch  time.Time // every timestamp in the image
	arch   string    // GOARCH
	oci    string    // OCI layout directory to write ("" to skip)
	tarOut string    // docker/OCI tarball to write ("" to skip)
}

func main() {
	o := options{}
	flag.StringVar(&o.repo, "repo", "../..", "the tern repository root")
	flag.StringVar(&o.tag, "tag", "tern:dev", "image reference")
	flag.StringVar(&o.arch, "arch", "amd64", "GOARCH of the binaries")
	flag.StringVar(&o.oci, "out", "../../bin/image/oci", "OCI image layout directory to write (replaced)")
	flag.StringVar(&o.tarOut, "tar", "", "also write a tarball for docker load / ctr images import")
	flag.Parse()
	epoch, err := sourceDateEpoch()
	if err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(2)
	}
	o.epoch = epoch
	img, err := build(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
	d, err := img.Digest()
	if err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
	if err := write(img, o); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
	fmt.Printf("%s %s\n", o.tag, d)
}

// sourceDateEpoch is the reproducible-builds convention for the one timestamp of a build.
func sourceDateEpoch() (time.Time, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		return time.Unix(0, 0).UTC(), nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH=%q is not seconds since 1970: %w", s, err)
	}
	return time.Unix(n, 0).UTC(), nil
}

// build compiles the binaries and assembles the image in memory.
func build(o options) (v1.Image, error) {
	repo, err := filepath.Abs(o.repo)
	if err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp("", "tern-image-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	args := []string{"build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w -buildid=", "-o", tmp + string(filepath.Separator)}
	for _, b := range binaries {
		args = append(args, "./cmd/"+b)
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+o.arch, "GOFLAGS=-mod=readonly")
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go %v in %s: %w\n%s", args, repo, err, out)
	}
	files := map[string][]byte{}
	for _, b := range binaries {
		data, err := os.ReadFile(filepath.Join(tmp, b))
		if err != nil {
			return nil, err
		}
		files[binDir+"/"+b] = data
	}
	layerTar, err := tarOf(files, o.epoch)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	base := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	img, err := mutate.Append(base, mutate.Addendum{Layer: layer, History: v1.History{
		Created: v1.Time{Time: o.epoch}, CreatedBy: "tern deploy/image: " + fmt.Sprint(binaries), Comment: "static binaries, BPF objects embedded",
	}})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = o.arch, "linux"
	cf.Created = v1.Time{Time: o.epoch}
	cf.Config.Entrypoint = []string{"/" + binDir + "/tern-agent"}
	cf.Config.Env = []string{"PATH=/" + binDir}
	cf.Config.Labels = map[string]string{"org.opencontainers.image.title": "tern", "org.opencontainers.image.source": "https://github.com/tern-net/tern"}
	return mutate.ConfigFile(img, cf)
}

// tarOf is a layer holding files (path → content, mode 0755) and their parent directories,
// every entry in sorted order, owned by root and stamped with epoch: the same files give the
// same bytes.
func tarOf(files map[string][]byte, epoch time.Time) ([]byte, error) {
	dirs := map[string]bool{}
	for p := range files {
		for d := filepath.Dir(p); d != "." && d != "/"; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	var names []string
	for d := range dirs {
		names = append(names, d+"/")
	}
	for p := range files {
		names = append(names, p)
	}
	slices.Sort(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		h := &tar.Header{Name: n, ModTime: epoch, Uid: 0, Gid: 0, Format: tar.FormatPAX}
		if data, ok := files[n]; ok {
			h.Typeflag, h.Mode, h.Size = tar.TypeReg, 0o755, int64(len(data))
		} else {
			h.Typeflag, h.Mode = tar.TypeDir, 0o755
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if data, ok := files[n]; ok {
			if _, err := tw.Write(data); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// write puts the image into an OCI layout directory (replacing it) and, if asked, a tarball.
func write(img v1.Image, o options) error {
	if o.oci != "" {
		if err := os.RemoveAll(o.oci); err != nil {
			return err
		}
		p, err := layout.Write(o.oci, empty.Index)
		if err != nil {
			return fmt.Errorf("OCI layout %s: %w", o.oci, err)
		}
		if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": o.tag})); err != nil {
			return fmt.Errorf("OCI layout %s: %w", o.oci, err)
		}
	}
	if o.tarOut != "" {
		ref, err := name.NewTag(o.tag)
		if err != nil {
			return fmt.Errorf("-tag %q: %w", o.tag, err)
		}
		if err := os.MkdirAll(filepath.Dir(o.tarOut), 0o755); err != nil {
			return err
		}
		if err := tarball.WriteToFile(o.tarOut, ref, img); err != nil {
			return fmt.Errorf("tarball %s: %w", o.tarOut, err)
		}
	}
	return nil
}
