package bandwidth

import (
	"fmt"

	"github.com/cilium/ebpf"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tern-net/tern/loader"
)

func TestFromAnnotations(t *testing.T) {
	for _, c := range []struct {
		name    string
		ann     map[string]string
		want    Limits
		wantErr string // substring; "" no error
	}{
		{"none", nil, Limits{}, ""},
		{"egress 10M", map[string]string{EgressAnnotation: "10M"}, Limits{Egress: 10_000_000}, ""},
		{"both", map[string]string{EgressAnnotation: "100M", IngressAnnotation: "1G"}, Limits{Egress: 100_000_000, Ingress: 1_000_000_000}, ""},
		{"binary suffix", map[string]string{IngressAnnotation: "1Mi"}, Limits{Ingress: 1 << 20}, ""},
		{"plain number", map[string]string{EgressAnnotation: "500000"}, Limits{Egress: 500_000}, ""},
		{"not a quantity, other direction kept", map[string]string{EgressAnnotation: "10 Mbit", IngressAnnotation: "5M"},
			Limits{Ingress: 5_000_000}, `kubernetes.io/egress-bandwidth="10 Mbit": not a Kubernetes quantity`},
		{"too small", map[string]string{EgressAnnotation: "999"}, Limits{}, "below the smallest limit"},
		{"too large", map[string]string{IngressAnnotation: "2P"}, Limits{}, "above the largest limit"},
		{"negative", map[string]string{IngressAnnotation: "-1M"}, Limits{}, "below the smallest limit"},
		{"both bad, both reported", map[string]string{EgressAnnotation: "x", IngressAnnotation: "y"}, Limits{}, "ingress-bandwidth"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := FromAnnotations(c.ann)
			if got != c.want {
				t.Errorf("limits = %+v, want %+v", got, c.want)
			}
			switch {
			case c.wantErr == "" && err != nil:
				t.Errorf("error %v, want none", err)
			case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
				t.Errorf("error %v, want one containing %q", err, c.wantErr)
			}
		})
	}
}

func TestDirectionEncoding(t *testing.T) {
	// 10 Mbit/s: 1.25 MB/s; the bucket holds BurstTime of it (312.5 kB, above MinBurst).
	d := direction(10_000_000, false)
	if d.Rate != 1_250_000 || d.BurstNs != uint64(BurstTime) {
		t.Fatalf("10 Mbit/s encodes as %+v, want rate 1250000 B/s and burst %d ns", d, uint64(BurstTime))
	}
	// 1 Mbit/s: 250 ms is 31 kB, below the 192 KiB floor.
	if d, want := direction(1_000_000, false), uint64(MinBurst)*uint64(time.Second)/125_000; d.BurstNs != want {
		t.Fatalf("burst at 1 Mbit/s %d ns, want %d (MinBurst at the rate)", d.BurstNs, want)
	}
	// EDT: the horizon covers 4 MiB at the rate (6.7 s at 5 Mbit/s), at least 2 s, at most 60 s.
	if d := direction(5_000_000, true); d.BurstNs != uint64(TSQHeadroom)*uint64(time.Second)/625_000 {
		t.Fatalf("EDT horizon at 5 Mbit/s %v, want 4 MiB at the rate", time.Duration(d.BurstNs))
	}
	if d := direction(1_000_000_000, true); d.BurstNs != uint64(MinHorizon) {
		t.Fatalf("EDT horizon at 1 Gbit/s %v, want %v", time.Duration(d.BurstNs), MinHorizon)
	}
	if d := direction(100_000, true); d.BurstNs != uint64(MaxHorizon) {
		t.Fatalf("EDT horizon at 100 kbit/s %v, want %v", time.Duration(d.BurstNs), MaxHorizon)
	}
	if d := direction(0, false); d != (loader.BWDir{}) {
		t.Fatalf("unlimited direction encodes as %+v, want zero", d)
	}
}

type fakeMaps struct {
	m      map[loader.BWKey]loader.BWValue
	writes int
}

func (f *fakeMaps) DumpBandwidth() (map[loader.BWKey]loader.BWValue, error) {
	out := map[loader.BWKey]loader.BWValue{}
	for k, v := range f.m {
		out[k] = v
	}
	return out, nil
}
func (f *fakeMaps) PutBandwidth(k loader.BWKey, v loader.BWValue) error {
	f.writes++
	f.m[k] = v
	return nil
}
func (f *fakeMaps) DeleteBandwidth(k loader.BWKey) error {
	if _, ok := f.m[k]; !ok {
		return fmt.Errorf("delete %v: %w", k, ebpf.ErrKeyNotExist)
	}
	delete(f.m, k)
	return nil
}

func TestManagerJoinsPodsAndEndpoints(t *testing.T) {
	a1, a2 := netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("10.0.0.6")
	// A previous agent left a limit on ifindex 9 (a pod that is gone) and on 7 (still here,
	// with a schedule the programs wrote).
	prev := Limits{Egress: 10_000_000}.value(ModePolicer)
	prev.Egress.Next = 12345
	maps := &fakeMaps{m: map[loader.BWKey]loader.BWValue{{Ifindex: 9}: prev, {Ifindex: 7}: prev}}
	eps := []Endpoint{{IfIndex: 7, Addr: a1}}
	allocated := map[string]netip.Addr{"ns/a": a1}
	mgr, err := NewManager(maps, Options{
		Mode:      ModePolicer,
		Endpoints: func() []Endpoint { return eps },
		PodAddrs:  func() map[string]netip.Addr { return allocated },
	})
	if err != nil {
		t.Fatal(err)
	}
	// Before the first full pod list nothing changes.
	mgr.SetPod("ns/a", netip.Addr{}, Limits{Egress: 10_000_000})
	if len(maps.m) != 2 || maps.writes != 0 {
		t.Fatalf("before sync: map %v, %d writes; want the previous agent's two entries untouched", maps.m, maps.writes)
	}
	mgr.MarkSynced()
	if _, ok := maps.m[loader.BWKey{Ifindex: 9}]; ok {
		t.Fatal("the gone pod's entry survived the first sync")
	}
	if v := maps.m[loader.BWKey{Ifindex: 7}]; v.Egress.Next != 12345 || maps.writes != 0 {
		t.Fatalf("an unchanged limit was rewritten (schedule %d, %d writes): it would reset the bucket", v.Egress.Next, maps.writes)
	}
	// A new pod: its address from the status until IPAM says otherwise; limited once its
	// endpoint attaches.
	mgr.SetPod("ns/b", a2, Limits{Ingress: 100_000_000})
	if len(maps.m) != 1 {
		t.Fatalf("pod b limited before its endpoint exists: %v", maps.m)
	}
	eps = append(eps, Endpoint{IfIndex: 8, Addr: a2})
	mgr.Sync()
	if v := maps.m[loader.BWKey{Ifindex: 8}]; v.Ingress.Rate != 12_500_000 || v.Egress.Rate != 0 {
		t.Fatalf("pod b's entry %+v, want ingress 12.5 MB/s only", v)
	}
	// Changed at run time.
	mgr.SetPod("ns/a", netip.Addr{}, Limits{Egress: 20_000_000})
	if v := maps.m[loader.BWKey{Ifindex: 7}]; v.Egress.Rate != 2_500_000 || v.Egress.Next != 0 {
		t.Fatalf("pod a's changed entry %+v, want 2.5 MB/s with a fresh schedule", v)
	}
	// Annotation removed; pod detached.
	mgr.SetPod("ns/a", netip.Addr{}, Limits{})
	if _, ok := maps.m[loader.BWKey{Ifindex: 7}]; ok {
		t.Fatal("pod a keeps a limit after its annotations went")
	}
	mgr.Forget(8)
	mgr.Forget(8) // a repeated detach is no error
	if len(maps.m) != 0 {
		t.Fatalf("entries left after detach: %v", maps.m)
	}
}
