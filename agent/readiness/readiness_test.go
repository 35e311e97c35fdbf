package readiness_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tern-net/tern/agent/readiness"
)

func get(t *testing.T, h http.Handler, target string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, target, nil))
	b, err := io.ReadAll(rec.Result().Body)
	if err != nil {
		t.Fatal(err)
	}
	return rec.Code, string(b)
}

// /readyz says 503 and which component waits for what until every component is ready, then
// 200; a component that goes back to not ready makes it 503 again.
func TestReadyzNamesWhatIsNotReady(t *testing.T) {
	r := readiness.New()
	agent, err := r.Register("agent", "starting the IP pool")
	if err != nil {
		t.Fatal(err)
	}
	svcs, err := r.Register("services", "waiting for the Service and EndpointSlice informers to sync")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Register("services", "again"); err == nil || !strings.Contains(err.Error(), `"services" is already registered`) {
		t.Fatalf("registering a name twice: %v; want an error naming it", err)
	}

	steps := []struct {
		do          func()
		code        int
		body        string
		verboseBody string
		summary     string
	}{
		{func() {}, 503,
			"agent: starting the IP pool\nservices: waiting for the Service and EndpointSlice informers to sync\nnot ready\n",
			"[-]agent: starting the IP pool\n[-]services: waiting for the Service and EndpointSlice informers to sync\nnot ready\n",
			"agent: starting the IP pool; services: waiting for the Service and EndpointSlice informers to sync"},
		{func() {
			agent.Ready()
			svcs.NotReady("first sync: 412 of 1000 Services translated")
		}, 503,
			"services: first sync: 412 of 1000 Services translated\nnot ready\n",
			"[+]agent ready\n[-]services: first sync: 412 of 1000 Services translated\nnot ready\n",
			"services: first sync: 412 of 1000 Services translated"},
		{svcs.Ready, 200, "ok\n", "[+]agent ready\n[+]services ready\nok\n", "ready"},
		{func() { agent.NotReady("stopping") }, 503, "agent: stopping\nnot ready\n",
			"[-]agent: stopping\n[+]services ready\nnot ready\n", "agent: stopping"},
	}
	for i, s := range steps {
		s.do()
		if code, body := get(t, r, "/readyz"); code != s.code || body != s.body {
			t.Errorf("step %d: /readyz = %d %q, want %d %q", i, code, body, s.code, s.body)
		}
		if code, body := get(t, r, "/readyz?verbose"); code != s.code || body != s.verboseBody {
			t.Errorf("step %d: /readyz?verbose = %d %q, want %d %q", i, code, body, s.code, s.verboseBody)
		}
		if got := r.Status().Summary(); got != s.summary {
			t.Errorf("step %d: summary %q, want %q", i, got, s.summary)
		}
	}
}

// Wait returns once the last component becomes ready, including one registered while it
// waits, and gives up with the reasons when its context ends.
func TestWaitFollowsEveryComponent(t *testing.T) {
	r := readiness.New()
	a, err := r.Register("a", "waiting for a")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Wait(context.Background()) }()

	b, err := r.Register("b", "waiting for b")
	if err != nil {
		t.Fatal(err)
	}
	a.Ready()
	select {
	case err := <-done:
		t.Fatalf("Wait returned (%v) while b is not ready", err)
	default:
	}
	b.Ready()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Wait did not return after every component became ready")
	}

	b.NotReady("resyncing")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := r.Wait(ctx); err == nil || !strings.Contains(err.Error(), "b: resyncing") {
		t.Fatalf("Wait with an ended context: %v; want an error with b's reason", err)
	}
}
