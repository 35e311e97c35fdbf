package agent

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	ttestutil "github.com/tern-net/tern/internal/testutil"
)

const peerCredSocketEnv = "TERN_TEST_PEERCRED_SOCKET"

// nobody is the uid and gid the non-root client runs as.
const nobody = 65534

// TestSocketRefusesNonRootPeers serves the CNI socket with its file mode opened to everyone
// (as a careless chmod would), then asks for the agent's status from a child process running
// as uid 65534: the connection must be closed unanswered, counted and logged, while root is
// answered; with 65534 in socketAllowedUIDs the same child is answered.
func TestSocketRefusesNonRootPeers(t *testing.T) {
	ttestutil.RequirePrivileged(t)
	// The child runs a copy of this test binary: the original sits in a build directory
	// only root may enter.
	dir := t.TempDir()
	bin := filepath.Join(dir, "agent.test")
	copyExecutable(t, os.Args[0], bin)
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}

	for _, tc := range []struct {
		name    string
		allowed []uint32
		want    string
	}{
		{"root only", nil, "closed"},
		{"uid allowed", []uint32{nobody}, "answered HTTP/1.1 200 OK"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			core, logs := observer.New(zap.WarnLevel)
			sock := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-"), "agent.sock")
			a, err := New(Config{NodeName: "n1", SocketPath: sock, SocketAllowedUIDs: tc.allowed}, zap.New(core))
			if err != nil {
				t.Fatal(err)
			}
			srv, remove, err := a.serveSocket()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { srv.Close(); remove() })
			if got := statusOver(t, sock); got != "answered HTTP/1.1 200 OK" {
				t.Fatalf("root client: %s", got)
			}
			// Open the way for uid 65534, so that only the peer check stands in it.
			if err := os.Chmod(filepath.Dir(sock), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(sock, 0o666); err != nil {
				t.Fatal(err)
			}

			cmd := exec.Command(bin, "-test.run=^TestPeerCredClientHelper$")
			cmd.Env = append(os.Environ(), peerCredSocketEnv+"="+sock)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("client as uid %d: %v\n%s", nobody, err, out)
			}
			got := ""
			for _, l := range strings.Split(string(out), "\n") {
				if r, ok := strings.CutPrefix(l, "RESULT: "); ok {
					got = r
				}
			}
			if got != tc.want {
				t.Fatalf("client as uid %d: %q, want %q\n%s", nobody, got, tc.want, out)
			}

			refused := testutil.ToFloat64(a.m.socketRefused)
			warned := logs.FilterMessageSnippet("refused a connection to the CNI socket").
				FilterField(zap.Uint32("uid", nobody)).Len()
			if tc.allowed == nil && (refused != 1 || warned != 1) {
				t.Fatalf("refusal counted %v times and logged %d times, want 1 and 1", refused, warned)
			}
			if tc.allowed != nil && (refused != 0 || warned != 0) {
				t.Fatalf("allowed uid: refusal counted %v times and logged %d times", refused, warned)
			}
		})
	}
}

// TestPeerCredClientHelper is the client of TestSocketRefusesNonRootPeers, run in a child
// process as another uid; it does nothing in a normal run.
func TestPeerCredClientHelper(t *testing.T) {
	sock := os.Getenv(peerCredSocketEnv)
	if sock == "" {
		return
	}
	fmt.Printf("uid %d\nRESULT: %s\n", os.Getuid(), statusOver(t, sock))
}

// statusOver asks for /v1/status on the socket and says what became of it: "answered" and the
// status line, "closed" when the agent hung up without a byte, or the error.
func statusOver(t *testing.T, sock string) string {
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		return "dial: " + err.Error()
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET /v1/status HTTP/1.1\r\nHost: tern\r\n\r\n"); err != nil {
		// The agent may have closed the connection before the request went out.
		return "closed"
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	switch {
	case err == nil:
		return "answered " + strings.TrimSpace(line)
	case line == "" && (err == io.EOF || strings.Contains(err.Error(), "connection reset")):
		return "closed"
	default:
		return fmt.Sprintf("read: %q %v", line, err)
	}
}

func copyExecutable(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o755); err != nil {
		t.Fatal(err)
	}
}
