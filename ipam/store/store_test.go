package store

import (
	"net/netip"
	"path/filepath"
	"testing"
	"time"
)

func TestStoreSurvivesReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ipam.db")
	s, err := Open(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	a := Allocation{Namespace: "ns", Name: "p", ContainerID: "c1", IP: netip.MustParseAddr("192.168.1.20"), ENIID: "eni-1", Allocated: time.Unix(100, 0).UTC()}
	err = s.Update(func(tx *Tx) error {
		if err := tx.PutENI(ENI{ID: "eni-1", MAC: "00:16:3e:00:00:01", IPs: []netip.Addr{a.IP}, CIDR: netip.MustParsePrefix("192.168.1.0/24")}); err != nil {
			return err
		}
		if err := tx.PutIntent(Intent{Token: "tok-1", Kind: IntentAssignIPs, ENIID: "eni-1", Count: 3}); err != nil {
			return err
		}
		return tx.PutAllocation(a)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = Open(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	snap, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Allocations) != 1 || snap.Allocations[0] != a {
		t.Fatalf("allocations after reopen = %+v, want [%+v]", snap.Allocations, a)
	}
	if len(snap.ENIs) != 1 || snap.ENIs[0].IPs[0] != a.IP || snap.ENIs[0].CIDR.Bits() != 24 {
		t.Fatalf("ENIs after reopen = %+v", snap.ENIs)
	}
	if len(snap.Intents) != 1 || snap.Intents[0].Count != 3 {
		t.Fatalf("intents after reopen = %+v", snap.Intents)
	}

	// A failed transaction leaves nothing behind.
	_ = s.Update(func(tx *Tx) error {
		_ = tx.DeleteAllocation(a.Key())
		return errTest
	})
	snap, _ = s.Load()
	if len(snap.Allocations) != 1 {
		t.Fatal("a rolled-back delete took effect")
	}
}

func TestSecondOpenFailsWhileLocked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ipam.db")
	s, err := Open(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := Open(path, 50*time.Millisecond); err == nil {
		t.Fatal("second Open of a locked file succeeded")
	}
}

type testErr string

func (e testErr) Error() string { return string(e) }

const errTest = testErr("rollback")
