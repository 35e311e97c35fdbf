package simulate_test

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policytest"
	"github.com/tern-net/tern/policy/simulate"
)

// The simulator — the compiler's output in private maps, decided by the real pod programs
// under BPF_PROG_TEST_RUN — agrees with the reference evaluator on every probe of 150
// random scenarios.
func TestSimulatorAgreesWithReference(t *testing.T) {
	testutil.RequirePrivileged(t)
	sim, err := simulate.New()
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	probes := 0
	for seed := uint64(1); seed <= 150; seed++ {
		sc := policytest.Random(seed, 30)
		want, err := policytest.Reference(&sc)
		if err != nil {
			t.Fatal(err)
		}
		var in []simulate.Probe
		for _, p := range sc.Probes {
			in = append(in, simulate.Probe{From: p.From, To: p.To, Port: int(p.Port), Protocol: p.Protocol})
		}
		got, err := sim.Run(sc.State, in)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		for i := range got {
			if got[i].Egress != want[i].Egress || got[i].Ingress != want[i].Ingress || got[i].Allowed != want[i].Allowed() {
				t.Fatalf("seed %d probe %d %+v: simulator %+v, reference %+v", seed, i, sc.Probes[i], got[i], want[i])
			}
			probes++
		}
	}
	t.Logf("%d probes agree", probes)
}

const stateYAML = `
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {team: shop}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: web, labels: {app: web}}
spec:
  containers:
  - name: c
    image: x
    ports: [{name: http, containerPort: 8080}]
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop, name: client, labels: {app: client}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: shop, name: web}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: http}]
`

func TestSimulateFromFiles(t *testing.T) {
	testutil.RequirePrivileged(t)
	st, err := simulate.ParseState(strings.NewReader(stateYAML))
	if err != nil {
		t.Fatal(err)
	}
	probes, err := simulate.ParseProbes(strings.NewReader(`[
		{"from": "shop/client", "to": "shop/web", "port": 8080, "protocol": "TCP"},
		{"from": "shop/client", "to": "shop/web", "port": 80, "protocol": "TCP"},
		{"from": "8.8.8.8", "to": "shop/web", "port": 8080, "protocol": "TCP"},
		{"from": "shop/web", "to": "8.8.8.8", "port": 53, "protocol": "UDP"}]`))
	if err != nil {
		t.Fatal(err)
	}
	sim, err := simulate.New()
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	res, err := sim.Run(st, probes)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := simulate.WriteJSON(&buf, res); err != nil {
		t.Fatal(err)
	}
	var got []map[string]any
	if err := json.Unmarshal(buf.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	want := []struct{ allowed, egress, ingress bool }{{true, true, true}, {false, true, false}, {false, true, false}, {true, true, true}}
	for i, w := range want {
		g := got[i]
		if g["allowed"] != w.allowed || g["egress"] != w.egress || g["ingress"] != w.ingress || g["from"] != probes[i].From ||
			g["to"] != probes[i].To || g["port"] != float64(probes[i].Port) || g["protocol"] != probes[i].Protocol {
			t.Errorf("result %d = %v, want allowed=%v egress=%v ingress=%v", i, g, w.allowed, w.egress, w.ingress)
		}
	}
	// Unknown pods are errors naming the probe and the pod.
	_, err = sim.Run(st, []simulate.Probe{{From: "shop/nope", To: "shop/web", Port: 80, Protocol: "TCP"}})
	if err == nil || !strings.Contains(err.Error(), "probe 0 from") || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("unknown pod: error %v", err)
	}
}

// Bad objects are errors that name the document and the field.
func TestParseStateErrors(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{`[{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}, "status": {}}]`, "state document 1 (Pod default/a): status.podIP"},
		{"apiVersion: v1\nkind: Service\nmetadata: {name: s}\n", `kind "Service"`},
		{"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np1}\nspec: {podSelectr: {}}\n", `unknown field "podSelectr"`},
	} {
		_, err := simulate.ParseState(strings.NewReader(c.in))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("ParseState(%q) error %v, want it to mention %q", c.in, err, c.want)
		}
	}
}

// ICMP (an echo request per probe) on the same random scenarios: the simulator's real
// programs, the compiled maps (Decide) and the reference evaluator agree. An isolated pod
// takes and sends ICMP only through rules without ports.
func TestSimulatorICMPAgreesWithReference(t *testing.T) {
	testutil.RequirePrivileged(t)
	sim, err := simulate.New()
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	allowed, denied := 0, 0
	for seed := uint64(1); seed <= 60; seed++ {
		sc := policytest.Random(seed, 30)
		for i := range sc.Probes {
			sc.Probes[i].Protocol, sc.Probes[i].Port = "ICMP", 0
		}
		want, err := policytest.Reference(&sc)
		if err != nil {
			t.Fatal(err)
		}
		d, err := policy.Compile(sc.State)
		if err != nil {
			t.Fatal(err)
		}
		var in []simulate.Probe
		for _, p := range sc.Probes {
			in = append(in, simulate.Probe{From: p.From, To: p.To, Protocol: "ICMP"})
		}
		got, err := sim.Run(sc.State, in)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		for i := range got {
			src, _ := policytest.Resolve(&sc.State, sc.Probes[i].From)
			dst, _ := policytest.Resolve(&sc.State, sc.Probes[i].To)
			eg, ing := d.Decide(src.Addr, dst.Addr, 1, 0)
			if got[i].Egress != want[i].Egress || got[i].Ingress != want[i].Ingress || eg != want[i].Egress || ing != want[i].Ingress {
				t.Fatalf("seed %d ICMP probe %d %+v: simulator %+v, compiled egress=%v ingress=%v, reference %+v",
					seed, i, sc.Probes[i], got[i], eg, ing, want[i])
			}
			if got[i].Allowed {
				allowed++
			} else {
				denied++
			}
		}
	}
	if allowed == 0 || denied == 0 {
		t.Fatalf("ICMP probes: %d allowed, %d denied: the scenarios must exercise both", allowed, denied)
	}
	t.Logf("ICMP: %d allowed, %d denied, all agree", allowed, denied)
}
