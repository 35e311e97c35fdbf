package agent

import (
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"go.uber.org/zap"
)

func TestPprofListenAddr(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		bad      bool
	}{
		{in: "", want: ""},
		{in: "6060", want: "127.0.0.1:6060"},
		{in: ":6060", want: "127.0.0.1:6060"},
		{in: "127.0.0.1:6061", want: "127.0.0.1:6061"},
		{in: "[::1]:6060", want: "[::1]:6060"},
		{in: "0.0.0.0:6060", want: "0.0.0.0:6060"},
		{in: "localhost", bad: true},
		{in: ":0", bad: true},
		{in: "127.0.0.1:70000", bad: true},
	} {
		got, err := PprofListenAddr(tc.in)
		if tc.bad {
			if err == nil || !strings.Contains(err.Error(), "pprofAddr") {
				t.Errorf("PprofListenAddr(%q) = %q, %v; want an error naming pprofAddr", tc.in, got, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("PprofListenAddr(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	cfg := Config{PprofAddr: "nope:port"}
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "pprofAddr") {
		t.Errorf("Validate with a bad pprofAddr: %v, want an error naming pprofAddr", err)
	}
}

// TestServePprof: the heap profile is served (in pprof's gzipped protobuf form), the
// command line is not.
func TestServePprof(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := ServePprof(ln, zap.NewNop())
	defer srv.Close()
	base := "http://" + ln.Addr().String()
	get := func(path string) (int, []byte) {
		t.Helper()
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, body
	}
	code, body := get("/debug/pprof/heap")
	if code != http.StatusOK || len(body) < 2 || body[0] != 0x1f || body[1] != 0x8b {
		t.Errorf("GET /debug/pprof/heap: %d, %d bytes starting %x; want 200 and a gzipped profile", code, len(body), body[:min(len(body), 4)])
	}
	if code, body := get("/debug/pprof/"); code != http.StatusOK || !strings.Contains(string(body), "goroutine") {
		t.Errorf("GET /debug/pprof/: %d %q, want 200 with the profile index", code, body)
	}
	if code, _ := get("/debug/pprof/cmdline"); code != http.StatusNotFound {
		t.Errorf("GET /debug/pprof/cmdline: %d, want 404 (the arguments are not served)", code)
	}
}
