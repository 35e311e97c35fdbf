package aliyun_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/credential"
	"github.com/tern-net/tern/test/ecsemu"
)

// writeTokenFile writes a Terway-format token file the way a rotation does: a new file
// renamed over the old one, so a reader never sees half of it.
func writeTokenFile(t *testing.T, path string, k ecsemu.AccessKey, expires time.Time) {
	t.Helper()
	keyring := []byte("0123456789abcdef")
	f := map[string]string{"keyring": string(keyring), "expiration": expires.UTC().Format("2006-01-02T15:04:05Z")}
	for field, plain := range map[string]string{"access.key.id": k.ID, "access.key.secret": k.Secret, "security.token": k.SecurityToken} {
		enc, err := credential.Encrypt([]byte(plain), keyring, []byte("fedcba9876543210"))
		if err != nil {
			t.Fatal(err)
		}
		f[field] = enc
	}
	data, err := json.Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	tmp := path + ".new"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// TestRotatedTokenFileIsUsedWithoutRestart rotates the STS key the emulator accepts and the
// token file the client reads: calls keep succeeding with the same client, and the old key
// is refused by the emulator.
func TestRotatedTokenFileIsUsedWithoutRestart(t *testing.T) {
	oldKey := ecsemu.AccessKey{ID: "STS.rotation-old", Secret: "old-secret", SecurityToken: "old-token"}
	newKey := ecsemu.AccessKey{ID: "STS.rotation-new", Secret: "new-secret", SecurityToken: "new-token"}
	cfg := ecsemu.TestConfig()
	cfg.AccessKeys = []ecsemu.AccessKey{oldKey}
	emu, ep := ecsemu.NewTestServer(t, cfg)
	path := filepath.Join(t.TempDir(), "token-config")
	writeTokenFile(t, path, oldKey, time.Now().Add(time.Hour))

	src, err := credential.NewFileSource(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	newClient := func(o aliyun.Options) *aliyun.Client {
		o.RegionID, o.Endpoint = ecsemu.TestRegion, ep
		o.Backoff = aliyun.Backoff{Initial: time.Millisecond, Max: time.Millisecond, Multiplier: 2, MaxAttempts: 1}
		c, err := aliyun.New(o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		return c
	}
	c := newClient(aliyun.Options{Credentials: src})
	// A client holding the old key for good: what an agent that read the file once would be.
	stale := newClient(aliyun.Options{Credential: credential.Credential{AccessKeyID: oldKey.ID, AccessKeySecret: oldKey.Secret, SecurityToken: oldKey.SecurityToken}})
	ctx := context.Background()
	call := func(c *aliyun.Client) error {
		_, err := c.Instance(ctx, "i-test-0001")
		return err
	}
	if err := call(c); err != nil {
		t.Fatalf("call with the token file's first key: %v", err)
	}

	// The platform rotates: the cloud accepts only the new key, and the file follows.
	emu.SetAccessKeys([]ecsemu.AccessKey{newKey})
	if err := call(c); !errors.Is(err, aliyun.ErrCredentials) {
		t.Fatalf("before the file is rotated the old key must be refused (ErrCredentials), got %v", err)
	}
	writeTokenFile(t, path, newKey, time.Now().Add(2*time.Hour))
	for i := range 3 {
		if err := call(c); err != nil {
			t.Fatalf("call %d after the token file was rotated: %v", i, err)
		}
	}
	if err := call(stale); !errors.Is(err, aliyun.ErrCredentials) {
		t.Fatalf("the old key after rotation: got %v, want ErrCredentials from the emulator", err)
	}

	// A token without its key's SecurityToken is refused too: the file's token is really sent.
	emu.SetAccessKeys([]ecsemu.AccessKey{newKey, {ID: "STS.other", Secret: "s", SecurityToken: "right"}})
	writeTokenFile(t, path, ecsemu.AccessKey{ID: "STS.other", Secret: "s", SecurityToken: "wrong"}, time.Now().Add(time.Hour))
	if err := call(c); !errors.Is(err, aliyun.ErrCredentials) {
		t.Fatalf("a key with the wrong SecurityToken: got %v, want ErrCredentials", err)
	}

	// A rotation caught half-written keeps the last good key in use instead of failing calls.
	writeTokenFile(t, path, newKey, time.Now().Add(time.Hour))
	if err := call(c); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(`{"access.key.id": "trunc`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := call(c); err != nil {
		t.Fatalf("a half-written token file must not break calls while the last key is valid: %v", err)
	}
}
