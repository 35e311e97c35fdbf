package fixedip

import (
	"net/netip"
	"testing"
	"time"
)

func TestDecideAdd(t *testing.T) {
	ip := netip.MustParseAddr("192.168.1.20")
	here := Node{Name: "node-2", Zone: "z-a"}
	pod := Pod{Namespace: "db", Name: "web-0", UID: "uid-new", Fixed: true, StatefulSet: "web", Ordinal: 0}
	rec := func(node string, ph Phase, uid, zone string) *Record {
		return &Record{Namespace: "db", Name: "web-0", IP: ip, VSwitchID: "vsw-a", ZoneID: zone, Node: node, ENIID: "eni-1",
			PodUID: uid, Phase: ph, StatefulSet: "web"}
	}
	for _, tc := range []struct {
		name string
		rec  *Record
		want Action
	}{
		{"no record: a new address, kept from then on", nil, Allocate},
		{"held on this node: restart in place", rec("node-2", PhaseHeld, "uid-old", "z-a"), TakeHere},
		{"in use on this node by an earlier sandbox", rec("node-2", PhaseInUse, "uid-old", "z-a"), TakeHere},
		{"moving to this node: finish the move after a crash", rec("node-2", PhaseMoving, "uid-new", "z-a"), TakeHere},
		{"held on another node: move it here", rec("node-1", PhaseHeld, "uid-old", "z-a"), Claim},
		{"in use on another node by a pod object that is gone", rec("node-1", PhaseInUse, "uid-old", "z-a"), Claim},
		{"moving to another node for an earlier pod", rec("node-3", PhaseMoving, "uid-old", "z-a"), Claim},
		{"in use on another node by this very pod: wait", rec("node-1", PhaseInUse, "uid-new", "z-a"), Wait},
		{"moving to another node for this very pod: wait", rec("node-3", PhaseMoving, "uid-new", "z-a"), Wait},
		{"another zone: refuse, whatever the phase", rec("node-1", PhaseHeld, "uid-old", "z-b"), Refuse},
		{"another zone on this node's record too", rec("node-2", PhaseHeld, "uid-old", "z-b"), Refuse},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := DecideAdd(tc.rec, pod, here)
			if d.Action != tc.want {
				t.Fatalf("DecideAdd = %s (%s); want %s", d.Action, d.Reason, tc.want)
			}
			if d.Reason == "" {
				t.Fatal("a decision without a reason")
			}
		})
	}
}

func TestDecideHold(t *testing.T) {
	ip := netip.MustParseAddr("192.168.1.20")
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	here := Node{Name: "node-1", Zone: "z-a"}
	held := func(node string, after time.Duration) *Record {
		return &Record{Namespace: "db", Name: "web-2", IP: ip, ZoneID: "z-a", Node: node, Phase: PhaseHeld,
			ReleaseAfter: now.Add(after), StatefulSet: "web"}
	}
	other := *held("node-1", time.Minute)
	other.IP = netip.MustParseAddr("192.168.1.21")
	inUse := *held("node-1", 0)
	inUse.Phase = PhaseInUse
	three := SetState{Exists: true, Replicas: 3}
	for _, tc := range []struct {
		name string
		rec  *Record
		set  SetState
		want HoldAction
	}{
		{"within the hold time", held("node-1", time.Second), three, Keep},
		{"hold time reached", held("node-1", 0), three, Release},
		{"past the hold time", held("node-1", -time.Second), three, Release},
		{"StatefulSet scaled below the ordinal", held("node-1", time.Hour), SetState{Exists: true, Replicas: 2}, Release},
		{"StatefulSet scaled to exactly the ordinal + 1 keeps it", held("node-1", time.Hour), three, Keep},
		{"StatefulSet deleted", held("node-1", time.Hour), SetState{}, Release},
		{"another node took it over", held("node-2", time.Hour), three, Forget},
		{"taken over even when the set is gone: forget, never release", held("node-2", -time.Hour), SetState{}, Forget},
		{"record gone", nil, three, Drop},
		{"record names another address", &other, three, Drop},
		{"a sandbox is being set up with it", &inUse, SetState{}, Keep},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, why := DecideHold(ip, tc.rec, 2, tc.set, here, now)
			if got != tc.want {
				t.Fatalf("DecideHold = %s (%s); want %s", got, why, tc.want)
			}
		})
	}
}

func TestOrdinal(t *testing.T) {
	for name, want := range map[string]int{"web-0": 0, "web-12": 12, "web-a-1": -1, "web-": -1, "web-01": -1, "db-1": -1, "web--1": -1} {
		if got := Ordinal(name, "web"); got != want {
			t.Errorf("Ordinal(%q, web) = %d; want %d", name, got, want)
		}
	}
	if got := Ordinal("web-a-1", "web-a"); got != 1 {
		t.Errorf("Ordinal(web-a-1, web-a) = %d; want 1", got)
	}
}
