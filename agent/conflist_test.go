package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"go.uber.org/zap"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/agent/readiness"
)

// The installed conflist must load the way containerd loads it and point at the socket.
func TestInstallConflist(t *testing.T) {
	dir := t.TempDir()
	a := &Agent{cfg: Config{CNIConfDir: filepath.Join(dir, "net.d"), SocketPath: "/run/x/agent.sock"}}
	path, err := a.installConflist()
	if err != nil {
		t.Fatal(err)
	}
	files, err := libcni.ConfFiles(a.cfg.CNIConfDir, []string{".conflist"})
	if err != nil || len(files) != 1 || files[0] != path || filepath.Base(path) != api.ConflistFile {
		t.Fatalf("conf files %v (%v), want only %s", files, err, path)
	}
	list, err := libcni.ConfListFromFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if list.Name != api.NetworkName || len(list.Plugins) != 1 || list.Plugins[0].Network.Type != "tern-cni" {
		t.Fatalf("conflist %+v", list)
	}
	if want := `"socket":"/run/x/agent.sock"`; !strings.Contains(string(list.Plugins[0].Bytes), want) {
		t.Fatalf("plugin config %s lacks %s", list.Plugins[0].Bytes, want)
	}
}

// The conflist is installed only once every readiness component is ready: before, the
// directory stays empty however long the wait.
func TestConflistWaitsForReadiness(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "net.d")
	a := &Agent{cfg: Config{CNIConfDir: dir, SocketPath: "/run/x/agent.sock"}, log: zap.NewNop(), readiness: readiness.New()}
	svcs, err := a.readiness.Register("services", "waiting for the informers' initial lists")
	if err != nil {
		t.Fatal(err)
	}
	waiting := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		close(waiting)
		done <- a.waitReadyForPods(context.Background())
	}()
	<-waiting
	svcs.NotReady("informers synced; first sync: writing 3 frontends of 2 Services to the BPF maps")
	if _, err := os.Stat(filepath.Join(dir, api.ConflistFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("conflist before the services component is ready: %v", err)
	}
	select {
	case err := <-done:
		t.Fatalf("waitReadyForPods returned (%v) while services is not ready", err)
	default:
	}
	svcs.Ready()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, api.ConflistFile)); err != nil {
		t.Fatalf("conflist after every component is ready: %v", err)
	}

	// A stopping agent stops waiting without an error and installs nothing.
	dir2 := filepath.Join(t.TempDir(), "net.d")
	b := &Agent{cfg: Config{CNIConfDir: dir2}, log: zap.NewNop(), readiness: readiness.New()}
	if _, err := b.readiness.Register("services", "waiting"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := b.waitReadyForPods(ctx); err != nil {
		t.Fatalf("waitReadyForPods with an ended context: %v", err)
	}
	if _, err := os.Stat(dir2); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("CNI directory of a node that never became ready: %v", err)
	}
}
