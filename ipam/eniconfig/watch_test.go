package eniconfig

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// configMapDir lays out a directory the way kubelet projects a ConfigMap volume:
// eni_conf -> ..data/eni_conf, ..data -> ..<version>/.
type configMapDir struct {
	t       *testing.T
	dir     string
	version int
}

func newConfigMapDir(t *testing.T, content string) *configMapDir {
	d := &configMapDir{t: t, dir: t.TempDir()}
	d.publish(content)
	if err := os.Symlink(filepath.Join("..data", "eni_conf"), filepath.Join(d.dir, "eni_conf")); err != nil {
		t.Fatal(err)
	}
	return d
}

// publish writes a new version directory and atomically swaps ..data to it, as kubelet does.
func (d *configMapDir) publish(content string) {
	d.version++
	vdir := filepath.Join(d.dir, "..v"+string(rune('0'+d.version)))
	if err := os.Mkdir(vdir, 0o755); err != nil {
		d.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(vdir, "eni_conf"), []byte(content), 0o644); err != nil {
		d.t.Fatal(err)
	}
	tmp := filepath.Join(d.dir, "..data_tmp")
	if err := os.Symlink(filepath.Base(vdir), tmp); err != nil {
		d.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(d.dir, "..data")); err != nil {
		d.t.Fatal(err)
	}
}

func TestWatcherFollowsConfigMapSwap(t *testing.T) {
	d := newConfigMapDir(t, `{"vswitches":{"z":["vsw-1"]},"security_group":"sg-1","max_pool_size":5}`)
	var got []Config
	w := NewWatcher(filepath.Join(d.dir, "eni_conf"), 0, nil, func(c Config) { got = append(got, c) })
	c, err := w.Load()
	if err != nil {
		t.Fatal(err)
	}
	if c.MaxPoolSize != 5 {
		t.Fatalf("initial max_pool_size = %d", c.MaxPoolSize)
	}

	w.Poll()
	if len(got) != 0 {
		t.Fatalf("callback ran without a change: %+v", got)
	}

	// A valid new version, published by swapping ..data (same size as before on purpose).
	d.publish(`{"vswitches":{"z":["vsw-2"]},"security_group":"sg-1","max_pool_size":7}`)
	w.Poll()
	if len(got) != 1 || got[0].MaxPoolSize != 7 || got[0].VSwitches["z"][0] != "vsw-2" {
		t.Fatalf("after swap got %+v, want one config with max_pool_size 7 and vsw-2", got)
	}

	// An invalid version is counted and ignored; the callback does not run.
	d.publish(`{"vswitches":{"z":["vsw-2"]},"security_group":"sg-1","max_pool_size":1,"min_pool_size":3}`)
	w.Poll()
	if len(got) != 1 {
		t.Fatalf("invalid config reached the callback: %+v", got[1:])
	}
	if n := counterValue(t, w.reloads.WithLabelValues("invalid")); n != 1 {
		t.Fatalf("invalid reloads = %v, want 1", n)
	}

	// Fixing it applies again.
	d.publish(`{"vswitches":{"z":["vsw-3"]},"security_group":"sg-1","max_pool_size":9}`)
	w.Poll()
	if len(got) != 2 || got[1].MaxPoolSize != 9 {
		t.Fatalf("after fix got %+v", got)
	}
	if n := counterValue(t, w.reloads.WithLabelValues("ok")); n != 2 {
		t.Fatalf("ok reloads = %v, want 2", n)
	}
}

func TestWatcherLoadRejectsInvalid(t *testing.T) {
	p := filepath.Join(t.TempDir(), "eni_conf")
	if err := os.WriteFile(p, []byte(`{"vswitches":{}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := NewWatcher(p, 0, nil, nil).Load(); err == nil {
		t.Fatal("Load accepted an invalid file")
	}
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
