package agent

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"

	"github.com/tern-net/tern/agent/api"
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
