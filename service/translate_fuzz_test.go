package service

import (
	"encoding/json"
	"reflect"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
)

// FuzzTranslate feeds Translate and the Builder arbitrary Service and EndpointSlice objects
// (as the JSON the apiserver would send) and checks what the datapath relies on: no panic,
// every frontend and backend is an address and port the BPF maps can hold, backends sorted
// and unique, the answer the same on a second run, the Builder agreeing with Translate, and
// the compact copies translating as main's translation of the API objects did (sameAsAPI).
func FuzzTranslate(f *testing.F) {
	seed := func(s *corev1.Service, eps ...*discoveryv1.EndpointSlice) {
		sb, _ := json.Marshal(s)
		eb, _ := json.Marshal(eps)
		f.Add(sb, eb)
	}
	seed(svc("web", []string{"10.96.0.10"},
		sport("http", corev1.ProtocolTCP, 80, intstr.FromString("web")),
		sport("dns", corev1.ProtocolUDP, 53, intstr.FromInt32(5353))),
		slice("web", "a", []discoveryv1.EndpointPort{eport("http", corev1.ProtocolTCP, 8080), eport("dns", corev1.ProtocolUDP, 5353)},
			ep{"10.0.0.1", nil}, ep{"10.0.0.2", ptr.To(true)}, ep{"10.0.0.3", ptr.To(false)}),
		slice("web", "b", []discoveryv1.EndpointPort{eport("http", corev1.ProtocolTCP, 9090)}, ep{"10.0.0.4", nil}))
	seed(svc("roll", []string{"10.96.0.13"}, sport("a", corev1.ProtocolTCP, 80, intstr.FromInt32(80))),
		termSlice("roll", "a", eport("a", corev1.ProtocolTCP, 80), []string{"10.0.0.5"}, []string{"10.0.0.6"}))
	seed(svc("d", []string{"fd00::10", "10.96.0.11"}, sport("", corev1.ProtocolSCTP, 9, intstr.FromInt32(9))),
		slice("d", "v4", []discoveryv1.EndpointPort{eport("", corev1.ProtocolSCTP, 9)}, ep{"10.0.0.9", nil}, ep{"255.255.255.255", nil}))
	seed(svc("bad", []string{"10.96.0.300", "None"}, sport("b", "ICMP", 70000, intstr.FromInt32(81))))

	f.Fuzz(func(t *testing.T, svcJSON, slicesJSON []byte) {
		var s corev1.Service
		var eps []*discoveryv1.EndpointSlice
		if json.Unmarshal(svcJSON, &s) != nil || json.Unmarshal(slicesJSON, &eps) != nil {
			return
		}
		eps = slices.DeleteFunc(eps, func(e *discoveryv1.EndpointSlice) bool { return e == nil })
		sameAsAPI(t, NewCompactor(), &s, eps)
		got, err := Translate(&s, eps)
		checkState(t, got)
		again, err2 := Translate(&s, eps)
		if !reflect.DeepEqual(got, again) || (err == nil) != (err2 == nil) || (err != nil && err.Error() != err2.Error()) {
			t.Fatalf("Translate is not deterministic:\n%v (%v)\n%v (%v)", got, err, again, err2)
		}

		// The Builder, fed the same objects one event at a time, must want the same state.
		// It files slices by their service-name label, so give every slice the Service's.
		s.Namespace, s.Name = "ns", "fuzz"
		b := NewBuilder()
		b.UpsertService(&s)
		for i, e := range eps {
			e = e.DeepCopy()
			e.Namespace, e.Name = "ns", "slice-"+string(rune('a'+i%26))+string(rune('0'+i/26%10))
			e.Labels = map[string]string{discoveryv1.LabelServiceName: "fuzz"}
			eps[i] = e
			b.UpsertSlice(e)
		}
		want, _ := Translate(&s, dedupeByName(eps))
		if built := b.State(); !reflect.DeepEqual(built, want) && !(len(built) == 0 && len(want) == 0) {
			t.Fatalf("Builder state %v, Translate %v", built, want)
		}
	})
}

// dedupeByName keeps the last slice of each name, as the Builder does with repeated upserts.
func dedupeByName(eps []*discoveryv1.EndpointSlice) []*discoveryv1.EndpointSlice {
	last := map[string]int{}
	for i, e := range eps {
		last[e.Name] = i
	}
	var out []*discoveryv1.EndpointSlice
	for i, e := range eps {
		if last[e.Name] == i {
			out = append(out, e)
		}
	}
	return out
}

// checkState fails unless st is something the lbmap encoder can write as is.
func checkState(t *testing.T, st State) {
	t.Helper()
	for fe, bs := range st {
		if !fe.Addr.Is4() || !isUnicastAddr(fe.Addr) || fe.Port == 0 {
			t.Fatalf("frontend %v: want a unicast IPv4 address and a non-zero port", fe)
		}
		if fe.Proto != TCP && fe.Proto != UDP && fe.Proto != SCTP {
			t.Fatalf("frontend %v: protocol %d", fe, fe.Proto)
		}
		if bs == nil {
			t.Fatalf("frontend %v: nil backends (want an empty list: a frontend without backends rejects)", fe)
		}
		for i, b := range bs {
			if !b.Addr.Is4() || !isUnicastAddr(b.Addr) || b.Port == 0 {
				t.Fatalf("frontend %v: backend %v is not a pod address and port", fe, b)
			}
			if i > 0 && compareBackends(bs[i-1], b) >= 0 {
				t.Fatalf("frontend %v: backends %v not sorted and unique", fe, bs)
			}
		}
	}
}

// FuzzTranslateFields builds the objects from the fields that matter, so the fuzzer explores
// addresses, ports, protocols, names and conditions directly rather than through JSON.
// addrs holds endpoint addresses separated by commas; conds holds each endpoint's ready,
// serving and terminating conditions in three bits (and a fourth: ready unset).
func FuzzTranslateFields(f *testing.F) {
	f.Add("10.96.0.10", "TCP", int32(80), "http", "http", "TCP", int32(8080), "10.0.0.1,10.0.0.2", uint16(0x1))
	f.Add("10.96.0.10", "UDP", int32(53), "", "", "UDP", int32(5353), "10.0.0.1,255.255.255.255,127.0.0.1", uint16(0x86))
	f.Add("None", "SCTP", int32(9), "a", "a", "SCTP", int32(9), "10.0.0.9", uint16(0))
	f.Add("10.96.0.300", "ICMP", int32(70000), "b", "b", "", int32(-1), "::1,fe80::1", uint16(0xffff))
	f.Fuzz(func(t *testing.T, clusterIP, proto string, port int32, name, epName, epProto string, epPort int32, addrs string, conds uint16) {
		s := svc("fuzz", []string{clusterIP}, sport(name, corev1.Protocol(proto), port, intstr.FromInt32(epPort)))
		es := slice("fuzz", "a", []discoveryv1.EndpointPort{eport(epName, corev1.Protocol(epProto), epPort)})
		for i, a := range splitComma(addrs) {
			c := conds >> (4 * (i % 4))
			cond := discoveryv1.EndpointConditions{Ready: ptr.To(c&1 != 0), Serving: ptr.To(c&2 != 0), Terminating: ptr.To(c&4 != 0)}
			if c&8 != 0 {
				cond.Ready = nil
			}
			es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{a}, Conditions: cond})
		}
		sameAsAPI(t, NewCompactor(), s, []*discoveryv1.EndpointSlice{es})
		got, err := Translate(s, []*discoveryv1.EndpointSlice{es})
		checkState(t, got)
		again, err2 := Translate(s, []*discoveryv1.EndpointSlice{es})
		if !reflect.DeepEqual(got, again) || (err == nil) != (err2 == nil) || (err != nil && err.Error() != err2.Error()) {
			t.Fatalf("Translate is not deterministic:\n%v (%v)\n%v (%v)", got, err, again, err2)
		}
	})
}

func splitComma(s string) []string {
	var out []string
	start := 0
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == ',' {
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return out
}
