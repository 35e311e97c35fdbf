package credential

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestEncryptedFileRoundTrip(t *testing.T) {
	key := []byte("0123456789abcdef")
	iv := []byte("fedcba9876543210")
	enc := func(s string) string {
		v, err := Encrypt([]byte(s), key, iv)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	doc, _ := json.Marshal(map[string]string{
		"access.key.id":     enc("STS.id"),
		"access.key.secret": enc("the-secret-that-is-longer-than-a-block"),
		"security.token":    enc("tok"),
		"expiration":        "2030-01-02T03:04:05Z",
		"keyring":           string(key),
	})
	p := filepath.Join(t.TempDir(), "token-config")
	if err := os.WriteFile(p, doc, 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Resolve("", "", p, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if c.AccessKeyID != "STS.id" || c.AccessKeySecret != "the-secret-that-is-longer-than-a-block" || c.SecurityToken != "tok" {
		t.Fatalf("decrypted %+v", c)
	}
	if !c.Expiration.Equal(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)) {
		t.Fatalf("expiration %v", c.Expiration)
	}

	// A wrong keyring is detected (padding check), not returned as garbage.
	bad, _ := json.Marshal(map[string]string{
		"access.key.id": enc("STS.id"), "access.key.secret": enc("s"), "security.token": enc("t"),
		"keyring": "ffffffffffffffff",
	})
	if err := os.WriteFile(p, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadEncryptedFile(p); err == nil {
		t.Fatal("wrong keyring accepted")
	}
}

func TestResolveOrder(t *testing.T) {
	env := map[string]string{EnvAccessKeyID: "envid", EnvAccessKeySecret: "envsecret"}
	c, err := Resolve("a", "b", "", func(k string) string { return env[k] })
	if err != nil || c.AccessKeyID != "a" || c.Source != "eni_conf" {
		t.Fatalf("explicit key: %+v %v", c, err)
	}
	c, err = Resolve("", "", "", func(k string) string { return env[k] })
	if err != nil || c.AccessKeyID != "envid" || c.Source != "env" {
		t.Fatalf("env key: %+v %v", c, err)
	}
	if _, err := Resolve("", "", "", func(string) string { return "" }); !errors.Is(err, ErrNoCredential) {
		t.Fatalf("no source: err = %v", err)
	}
}
