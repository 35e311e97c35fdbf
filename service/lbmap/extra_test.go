package lbmap

import (
	"reflect"
	"testing"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
)

// HostPort frontends (SetExtra) live in the same maps as the Services' but the Service side
// never deletes them: not by a full Sync, not by Apply of a frontend the Services lack. A
// clash goes to the Service and returns to the hostPort when the Service gives it up; a
// restarted agent's reconciler (a new one over the same maps) keeps them once told again.
func TestExtraFrontendsSurviveServiceSyncs(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	m := d.Maps()
	r, err := NewReconciler(m, nil)
	if err != nil {
		t.Fatal(err)
	}
	web := fe("10.96.0.10", 80, service.TCP)
	hp := fe("192.168.0.2", 8080, service.TCP)
	hpUDP := fe("192.168.0.2", 5353, service.UDP)
	clash := fe("192.168.0.2", 30080, service.TCP)
	svcs := service.State{web: {be("10.0.0.1", 80)}, clash: {be("10.0.0.9", 80)}}
	hostPorts := service.State{hp: {be("10.0.0.5", 80)}, hpUDP: {be("10.0.0.5", 53)}, clash: {be("10.0.0.5", 81)}}

	if err := r.SyncWith(svcs, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.SetExtra(hostPorts); err != nil {
		t.Fatal(err)
	}
	want := service.State{web: svcs[web], clash: svcs[clash], hp: hostPorts[hp], hpUDP: hostPorts[hpUDP]}
	if got := mapState(t, m); !reflect.DeepEqual(got, want) {
		t.Fatalf("after SetExtra the maps hold %v, want %v (the Service keeps the clashing frontend)", got, want)
	}
	// A full sync of the Services alone keeps every hostPort.
	if err := r.SyncWith(svcs, nil); err != nil {
		t.Fatal(err)
	}
	if got := mapState(t, m); !reflect.DeepEqual(got, want) {
		t.Fatalf("a Service full sync changed the maps to %v, want %v", got, want)
	}
	// Apply of a frontend the Services do not have does not delete the hostPort either.
	none := service.State{}
	if err := r.Apply(none.Lookup, []service.Frontend{hp}); err != nil {
		t.Fatal(err)
	}
	if got := mapState(t, m); !reflect.DeepEqual(got, want) {
		t.Fatalf("Apply without the hostPort frontend changed the maps to %v, want %v", got, want)
	}
	// The Service gives the clashing address up: the hostPort takes it.
	delete(svcs, clash)
	if err := r.Apply(svcs.Lookup, []service.Frontend{clash}); err != nil {
		t.Fatal(err)
	}
	want[clash] = hostPorts[clash]
	if got := mapState(t, m); !reflect.DeepEqual(got, want) {
		t.Fatalf("after the Service left %s the maps hold %v, want %v", clash, got, want)
	}
	// An agent restart: a new reconciler reads the maps, is told the hostPorts again, and
	// its first full sync keeps them.
	r2, err := NewReconciler(m, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := r2.SetExtra(hostPorts); err != nil {
		t.Fatal(err)
	}
	if err := r2.SyncWith(svcs, nil); err != nil {
		t.Fatal(err)
	}
	if got := mapState(t, m); !reflect.DeepEqual(got, want) {
		t.Fatalf("after a restart's first sync the maps hold %v, want %v", got, want)
	}
	// Dropping a hostPort removes exactly it.
	delete(hostPorts, hpUDP)
	if err := r2.SetExtra(hostPorts); err != nil {
		t.Fatal(err)
	}
	delete(want, hpUDP)
	if got := mapState(t, m); !reflect.DeepEqual(got, want) {
		t.Fatalf("after dropping %s the maps hold %v, want %v", hpUDP, got, want)
	}
}
