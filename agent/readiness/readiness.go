// Package readiness tells whether a node can network pods yet. Each part of the agent that
// must be in place before a pod's first packet (the datapath's Services today, policy later)
// registers a named component and reports it ready, or not ready with a reason an operator
// can act on. The agent serves the result on /readyz, answers CNI STATUS from it and installs
// the CNI configuration only once every component is ready.
//
// A component registered after the agent started waiting is waited for too; a component that
// goes back to not ready makes the node not ready again (the CNI configuration, once
// installed, stays: pods already running keep their networking).
package readiness

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Registry holds the components. The zero value is not usable; use New.
type Registry struct {
	mu      sync.Mutex
	comps   []*Component  // in registration order, which is the order reports list them
	changed chan struct{} // closed and replaced on every change, to wake Wait
}

// New returns an empty registry. An empty registry is ready.
func New() *Registry {
	return &Registry{changed: make(chan struct{})}
}

// Component is one registered part, not ready until Ready is called.
type Component struct {
	r    *Registry
	name string

	// Guarded by r.mu.
	ready  bool
	reason string
	since  time.Time
}

// Register adds a component, not ready for reason. Names are unique: registering a name
// twice is a programming error and returns an error naming it.
func (r *Registry) Register(name, reason string) (*Component, error) {
	if name == "" {
		return nil, fmt.Errorf("readiness: a component needs a name")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range r.comps {
		if c.name == name {
			return nil, fmt.Errorf("readiness: component %q is already registered", name)
		}
	}
	c := &Component{r: r, name: name, reason: reason, since: time.Now()}
	r.comps = append(r.comps, c)
	r.notifyLocked()
	return c, nil
}

// Name is the component's name.
func (c *Component) Name() string { return c.name }

// Ready marks the component ready.
func (c *Component) Ready() { c.set(true, "") }

// NotReady marks the component not ready, saying why (what it waits for, or what failed and
// what it does about it). Calling it again only updates the reason.
func (c *Component) NotReady(reason string) { c.set(false, reason) }

func (c *Component) set(ready bool, reason string) {
	r := c.r
	r.mu.Lock()
	defer r.mu.Unlock()
	if c.ready == ready && c.reason == reason {
		return
	}
	if c.ready != ready {
		c.since = time.Now()
	}
	c.ready, c.reason = ready, reason
	r.notifyLocked()
}

func (r *Registry) notifyLocked() {
	close(r.changed)
	r.changed = make(chan struct{})
}

// ComponentStatus is one component's state in a Status.
type ComponentStatus struct {
	Name   string    `json:"name"`
	Ready  bool      `json:"ready"`
	Reason string    `json:"reason,omitempty"` // why it is not ready; empty when ready
	Since  time.Time `json:"since"`            // when it last became ready or not ready
}

func (s ComponentStatus) String() string {
	if s.Ready {
		return s.Name + ": ready"
	}
	return s.Name + ": " + s.Reason
}

// Status is a snapshot of every component.
type Status struct {
	Ready      bool              `json:"ready"`
	Components []ComponentStatus `json:"components"`
}

// Status reports every component, in registration order.
func (r *Registry) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.statusLocked()
}

func (r *Registry) statusLocked() Status {
	s := Status{Ready: true, Components: make([]ComponentStatus, len(r.comps))}
	for i, c := range r.comps {
		s.Components[i] = ComponentStatus{Name: c.name, Ready: c.ready, Reason: c.reason, Since: c.since}
		if !c.ready {
			s.Ready = false
		}
	}
	return s
}

// NotReady lists the components that are not ready, one "name: reason" each.
func (s Status) NotReady() []string {
	var out []string
	for _, c := range s.Components {
		if !c.Ready {
			out = append(out, c.String())
		}
	}
	return out
}

// Summary is one line for logs and CNI STATUS: "ready", or every not-ready component with
// its reason, separated by "; ".
func (s Status) Summary() string {
	if s.Ready {
		return "ready"
	}
	return strings.Join(s.NotReady(), "; ")
}

// Wait blocks until every component is ready or ctx ends.
func (r *Registry) Wait(ctx context.Context) error {
	for {
		r.mu.Lock()
		s := r.statusLocked()
		ch := r.changed
		r.mu.Unlock()
		if s.Ready {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("waiting for readiness (%s): %w", s.Summary(), ctx.Err())
		}
	}
}

// ServeHTTP answers /readyz: 200 "ok" when every component is ready, otherwise 503 with one
// line per component that is not ready ("services: waiting for ..."). With ?verbose every
// component is listed, ready ones as "[+]name ready" and others as "[-]name: reason", the way
// kube-apiserver's /readyz?verbose reads.
func (r *Registry) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	s := r.Status()
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	code := http.StatusOK
	if !s.Ready {
		code = http.StatusServiceUnavailable
	}
	w.WriteHeader(code)
	var b strings.Builder
	if _, verbose := req.URL.Query()["verbose"]; verbose {
		for _, c := range s.Components {
			if c.Ready {
				fmt.Fprintf(&b, "[+]%s ready\n", c.Name)
			} else {
				fmt.Fprintf(&b, "[-]%s: %s\n", c.Name, c.Reason)
			}
		}
	} else {
		for _, line := range s.NotReady() {
			b.WriteString(line + "\n")
		}
	}
	if s.Ready {
		b.WriteString("ok\n")
	} else {
		b.WriteString("not ready\n")
	}
	_, _ = w.Write([]byte(b.String()))
}
