package credential

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeFile(t *testing.T, path, id string, expires time.Time) {
	t.Helper()
	key, iv := []byte("0123456789abcdef"), []byte("fedcba9876543210")
	f := map[string]string{"keyring": string(key), "expiration": expires.UTC().Format(expirationLayout)}
	for field, plain := range map[string]string{"access.key.id": id, "access.key.secret": "secret-of-" + id, "security.token": "token-of-" + id} {
		v, err := Encrypt([]byte(plain), key, iv)
		if err != nil {
			t.Fatal(err)
		}
		f[field] = v
	}
	doc, _ := json.Marshal(f)
	if err := os.WriteFile(path+".tmp", doc, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		t.Fatal(err)
	}
}

// TestFileSourceFollowsRotation: a new file is read on the next Get; a bad file keeps the
// last good credential while it is valid, and the error never carries key material; once
// that credential has expired, a bad file is an error.
func TestFileSourceFollowsRotation(t *testing.T) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	p := filepath.Join(t.TempDir(), "token-config")
	writeFile(t, p, "STS.one", now.Add(time.Hour))
	s, err := NewFileSource(p, clock)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := s.Get(); err != nil || c.AccessKeyID != "STS.one" || c.SecurityToken != "token-of-STS.one" {
		t.Fatalf("first Get = %+v, %v", c, err)
	}
	writeFile(t, p, "STS.two", now.Add(2*time.Hour))
	if c, err := s.Get(); err != nil || c.AccessKeyID != "STS.two" || c.AccessKeySecret != "secret-of-STS.two" {
		t.Fatalf("Get after rotation = %+v, %v; want STS.two", c, err)
	}
	if err := os.WriteFile(p, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := s.Get()
	if err == nil || c.AccessKeyID != "STS.two" {
		t.Fatalf("Get of a broken file = %+v, %v; want the last good key and an error", c, err)
	}
	if strings.Contains(err.Error(), "STS.two") || strings.Contains(err.Error(), "secret-of") {
		t.Fatalf("error leaks key material: %v", err)
	}
	// Reported once per bad version of the file, not on every call.
	if c, err := s.Get(); err != nil || c.AccessKeyID != "STS.two" {
		t.Fatalf("second Get of the same broken file = %+v, %v; want the last good key, no error", c, err)
	}
	now = now.Add(3 * time.Hour)
	if c, err := s.Get(); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("Get with an expired key and a broken file = %+v, %v; want an expiry error", c, err)
	}
	writeFile(t, p, "STS.three", now.Add(time.Hour))
	if c, err := s.Get(); err != nil || c.AccessKeyID != "STS.three" {
		t.Fatalf("Get after recovery = %+v, %v", c, err)
	}
	// Not rotated before its expiration: the file is read again on every call, and until a
	// newer one appears Get refuses to sign with the expired key.
	now = now.Add(time.Hour)
	for i := range 2 {
		if c, err := s.Get(); err == nil || c.AccessKeyID != "" || !strings.Contains(err.Error(), "expired") || !strings.Contains(err.Error(), "no newer one") {
			t.Fatalf("Get %d with the file's only credential expired = %+v, %v; want no key and an expiry error", i+1, c, err)
		}
	}
	writeFile(t, p, "STS.four", now.Add(time.Hour))
	if c, err := s.Get(); err != nil || c.AccessKeyID != "STS.four" {
		t.Fatalf("Get after a late rotation = %+v, %v; want STS.four", c, err)
	}
}
