package agent

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tern-net/tern/agent/api"
)

// FuzzSocketAPI sends arbitrary HTTP requests, as the socket server would parse them, to the
// agent's handler before its pool and datapath exist (the state every request meets first,
// and the one that needs no root). It checks that no request panics, that every answer of the
// API's routes is JSON, that an error carries a CNI code matching its HTTP status, that no
// request is served as a success before the agent is ready, and that the same request gets
// the same answer.
func FuzzSocketAPI(f *testing.F) {
	for _, r := range []string{
		"POST /v1/pods/allocate HTTP/1.1\r\nHost: tern\r\nContent-Type: application/json\r\nContent-Length: 75\r\n\r\n" +
			`{"namespace":"default","name":"web-0","containerID":"abc","ifName":"eth0"}` + "\n",
		"POST /v1/pods/release HTTP/1.1\r\nHost: tern\r\nContent-Length: 20\r\n\r\n" + `{"containerID":"ab"}`,
		"POST /v1/pods/lookup HTTP/1.1\r\nHost: tern\r\nContent-Length: 2\r\n\r\n{}",
		"POST /v1/pods/attach HTTP/1.1\r\nHost: tern\r\nContent-Length: 90\r\n\r\n" +
			`{"namespace":"a","name":"b","containerID":"c","ifIndex":7,"ip":"10.0.0.1","mac":"02:00:00:00:00:01"}`,
		"POST /v1/pods/detach HTTP/1.1\r\nHost: tern\r\nContent-Length: 13\r\n\r\n" + `{"ifIndex":0}`,
		"POST /v1/gc HTTP/1.1\r\nHost: tern\r\nContent-Length: 26\r\n\r\n" + `{"validAttachments":null}`,
		"GET /v1/status HTTP/1.1\r\nHost: tern\r\n\r\n",
		"GET /v1/state HTTP/1.1\r\nHost: tern\r\n\r\n",
		"POST /v1/pods/allocate HTTP/1.1\r\nHost: tern\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n0\r\n\r\n",
	} {
		f.Add([]byte(r))
	}
	a, err := New(Config{NodeName: "fuzz", SocketPath: filepath.Join(f.TempDir(), "agent.sock")}, nil)
	if err != nil {
		f.Fatal(err)
	}
	h := a.handler()
	serve := func(raw []byte) (*httptest.ResponseRecorder, bool) {
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(raw)))
		if err != nil {
			return nil, false
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		return w, true
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		w, ok := serve(raw)
		if !ok {
			return
		}
		req, _ := http.ReadRequest(bufio.NewReader(bytes.NewReader(raw)))
		path := req.URL.Path
		if path == api.PathMetrics || !strings.HasPrefix(w.Header().Get("Content-Type"), "application/json") {
			// Prometheus' text, or the mux's own 404/405 for paths and methods it has no route for.
			if w.Code == http.StatusOK && path != api.PathMetrics {
				t.Fatalf("%s %s: 200 without a JSON answer", req.Method, path)
			}
			return
		}
		if w.Code == http.StatusOK {
			if path != api.PathStatus {
				t.Fatalf("%s %s served as a success before the agent is ready: %s", req.Method, path, w.Body)
			}
			var st api.Status
			if err := json.Unmarshal(w.Body.Bytes(), &st); err != nil || st.Ready {
				t.Fatalf("status answer %q (%v): want not ready", w.Body, err)
			}
		} else {
			var e api.Error
			if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil {
				t.Fatalf("%s %s: error answer %q is not an api.Error: %v", req.Method, path, w.Body, err)
			}
			if e.Code == 0 || e.Msg == "" || httpStatus(e.Code) != w.Code {
				t.Fatalf("%s %s: error %+v with HTTP %d", req.Method, path, e, w.Code)
			}
		}
		again, _ := serve(raw)
		if again.Code != w.Code || again.Body.String() != w.Body.String() {
			t.Fatalf("%s %s: a replay got %d %q, first %d %q", req.Method, path, again.Code, again.Body, w.Code, w.Body)
		}
	})
}
