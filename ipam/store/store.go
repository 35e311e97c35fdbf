// Package store keeps the ENI pool's durable state in a bbolt file: which pod holds which
// address, which ENIs and addresses the node owns, and intent records written before each cloud
// call so that a crash between the call and the local write is recovered on restart by replaying
// the call with its idempotency token. Every write is one transaction, fsynced before it returns.
package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"time"

	bolt "go.etcd.io/bbolt"
)

var (
	bucketAllocations = []byte("allocations")
	bucketENIs        = []byte("enis")
	bucketIntents     = []byte("intents")
	bucketMeta        = []byte("meta")
)

// Allocation is an address held by one pod sandbox.
type Allocation struct {
	Namespace   string     `json:"namespace"`
	Name        string     `json:"name"`
	ContainerID string     `json:"containerID"`
	IP          netip.Addr `json:"ip"`
	ENIID       string     `json:"eniID"`
	Allocated   time.Time  `json:"allocated"`
}

// Key is the allocation's identity: namespace/name/containerID.
func (a Allocation) Key() string { return AllocationKey(a.Namespace, a.Name, a.ContainerID) }

// AllocationKey builds the key of an allocation.
func AllocationKey(namespace, name, containerID string) string {
	return namespace + "/" + name + "/" + containerID
}

// ENI is an ENI the node owns, with every secondary address it has.
type ENI struct {
	ID        string       `json:"id"`
	MAC       string       `json:"mac"`
	VSwitchID string       `json:"vSwitchID"`
	CIDR      netip.Prefix `json:"cidr"`
	PrimaryIP netip.Addr   `json:"primaryIP"`
	IPs       []netip.Addr `json:"ips"` // secondary addresses
	State     string       `json:"state"`
}

// Intent kinds.
const (
	IntentCreateENI   = "create-eni"
	IntentAssignIPs   = "assign-ips"
	IntentUnassignIPs = "unassign-ips"
	IntentDeleteENI   = "delete-eni"
	// IntentCreateRoute is the VPC route mode's CreateRouteEntry for the node's pod CIDR
	// (Route, RouteTableID).
	IntentCreateRoute = "create-route"
)

// Intent is a cloud operation that was about to start. It is written before the call and
// deleted in the same transaction that records the call's outcome; one still present at start-up
// was interrupted, and the call is replayed with the same token (the cloud answers with the
// first call's outcome) rather than read back from a listing, which may lag.
type Intent struct {
	Token     string       `json:"token"` // also the ClientToken of the call
	Kind      string       `json:"kind"`
	ENIID     string       `json:"eniID,omitempty"`
	VSwitchID string       `json:"vSwitchID,omitempty"`
	Count     int          `json:"count,omitempty"`
	IPs       []netip.Addr `json:"ips,omitempty"`
	// Route and RouteTableID describe a create-route intent.
	Route        netip.Prefix `json:"route,omitempty"`
	RouteTableID string       `json:"routeTableID,omitempty"`
	Created      time.Time    `json:"created"`
}

// Store is an open state file.
type Store struct {
	db *bolt.DB
}

// Open opens or creates the state file. Only one process may have it open; a second Open
// waits up to timeout for the lock and then fails.
func Open(path string, timeout time.Duration) (*Store, error) {
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: timeout})
	if err != nil {
		return nil, fmt.Errorf("open IPAM state %s: %w (is another tern-agent running?)", path, err)
	}
	// Crash safety rests on this: each Update fsyncs before returning.
	db.NoSync = false
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketAllocations, bucketENIs, bucketIntents, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("initialise IPAM state %s: %w", path, err)
	}
	return &Store{db: db}, nil
}

// Close closes the file.
func (s *Store) Close() error { return s.db.Close() }

// Path is the file's path.
func (s *Store) Path() string { return s.db.Path() }

// Tx is a read-write transaction; the methods buffer changes that commit together.
type Tx struct{ tx *bolt.Tx }

// Update runs fn in one transaction, committed (and fsynced) when fn returns nil.
func (s *Store) Update(fn func(*Tx) error) error {
	return s.db.Update(func(tx *bolt.Tx) error { return fn(&Tx{tx}) })
}

// PutAllocation records an allocation.
func (t *Tx) PutAllocation(a Allocation) error { return put(t.tx, bucketAllocations, a.Key(), a) }

// DeleteAllocation removes an allocation; a missing one is not an error.
func (t *Tx) DeleteAllocation(key string) error {
	return t.tx.Bucket(bucketAllocations).Delete([]byte(key))
}

// PutENI records an ENI.
func (t *Tx) PutENI(e ENI) error { return put(t.tx, bucketENIs, e.ID, e) }

// DeleteENI removes an ENI; a missing one is not an error.
func (t *Tx) DeleteENI(id string) error { return t.tx.Bucket(bucketENIs).Delete([]byte(id)) }

// PutIntent records an intent.
func (t *Tx) PutIntent(i Intent) error {
	if i.Token == "" {
		return errors.New("intent without token")
	}
	return put(t.tx, bucketIntents, i.Token, i)
}

// DeleteIntent removes an intent; a missing one is not an error.
func (t *Tx) DeleteIntent(token string) error {
	return t.tx.Bucket(bucketIntents).Delete([]byte(token))
}

// SetMeta stores a small named value.
func (t *Tx) SetMeta(key, value string) error {
	return t.tx.Bucket(bucketMeta).Put([]byte(key), []byte(value))
}

// Convenience single-operation writes.

// PutAllocation records an allocation in its own transaction.
func (s *Store) PutAllocation(a Allocation) error {
	return s.Update(func(t *Tx) error { return t.PutAllocation(a) })
}

// DeleteAllocation removes an allocation in its own transaction.
func (s *Store) DeleteAllocation(key string) error {
	return s.Update(func(t *Tx) error { return t.DeleteAllocation(key) })
}

// PutIntent records an intent in its own transaction.
func (s *Store) PutIntent(i Intent) error {
	return s.Update(func(t *Tx) error { return t.PutIntent(i) })
}

// DeleteIntent removes an intent in its own transaction.
func (s *Store) DeleteIntent(token string) error {
	return s.Update(func(t *Tx) error { return t.DeleteIntent(token) })
}

// Snapshot is the whole state at one instant.
type Snapshot struct {
	Allocations []Allocation
	ENIs        []ENI
	Intents     []Intent
	Meta        map[string]string
}

// Load reads everything in one read transaction.
func (s *Store) Load() (Snapshot, error) {
	var snap Snapshot
	err := s.db.View(func(tx *bolt.Tx) error {
		if err := each(tx, bucketAllocations, func(a Allocation) { snap.Allocations = append(snap.Allocations, a) }); err != nil {
			return err
		}
		if err := each(tx, bucketENIs, func(e ENI) { snap.ENIs = append(snap.ENIs, e) }); err != nil {
			return err
		}
		if err := each(tx, bucketIntents, func(i Intent) { snap.Intents = append(snap.Intents, i) }); err != nil {
			return err
		}
		snap.Meta = map[string]string{}
		return tx.Bucket(bucketMeta).ForEach(func(k, v []byte) error {
			snap.Meta[string(k)] = string(v)
			return nil
		})
	})
	if err != nil {
		return Snapshot{}, fmt.Errorf("read IPAM state %s: %w", s.db.Path(), err)
	}
	return snap, nil
}

func put(tx *bolt.Tx, bucket []byte, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s/%s: %w", bucket, key, err)
	}
	return tx.Bucket(bucket).Put([]byte(key), b)
}

func each[T any](tx *bolt.Tx, bucket []byte, fn func(T)) error {
	return tx.Bucket(bucket).ForEach(func(k, v []byte) error {
		var x T
		if err := json.Unmarshal(v, &x); err != nil {
			return fmt.Errorf("decode %s/%s: %w (the state file is corrupt; move it aside to rebuild from the cloud)", bucket, k, err)
		}
		fn(x)
		return nil
	})
}
