package store

import (
	"encoding/json"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// Each optional resource kind (ipam.Kinds: exclusive ENIs, trunk members…) keeps its records in
// a bucket of its own, "kind/<name>", so that the ENIIP pool's buckets (and its handling of
// intents it does not know) never see them. A record carries its own state, including the
// intent of a cloud call under way.

func kindBucket(kind string) []byte { return []byte("kind/" + kind) }

// PutKindRecord stores v (JSON) under key in the kind's bucket, creating the bucket.
func (t *Tx) PutKindRecord(kind, key string, v any) error {
	b, err := t.tx.CreateBucketIfNotExists(kindBucket(kind))
	if err != nil {
		return fmt.Errorf("create bucket of kind %s: %w", kind, err)
	}
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s record %s: %w", kind, key, err)
	}
	return b.Put([]byte(key), data)
}

// DeleteKindRecord removes key from the kind's bucket; a missing one is not an error.
func (t *Tx) DeleteKindRecord(kind, key string) error {
	b := t.tx.Bucket(kindBucket(kind))
	if b == nil {
		return nil
	}
	return b.Delete([]byte(key))
}

// PutKindRecord stores one record in its own transaction.
func (s *Store) PutKindRecord(kind, key string, v any) error {
	return s.Update(func(t *Tx) error { return t.PutKindRecord(kind, key, v) })
}

// DeleteKindRecord removes one record in its own transaction.
func (s *Store) DeleteKindRecord(kind, key string) error {
	return s.Update(func(t *Tx) error { return t.DeleteKindRecord(kind, key) })
}

// LoadKind returns every record of the kind, raw, by key.
func (s *Store) LoadKind(kind string) (map[string]json.RawMessage, error) {
	out := map[string]json.RawMessage{}
	err := s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(kindBucket(kind))
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, v []byte) error {
			out[string(k)] = json.RawMessage(append([]byte(nil), v...))
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("read %s records from %s: %w", kind, s.db.Path(), err)
	}
	return out, nil
}
