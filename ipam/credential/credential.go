// Package credential finds the Alibaba Cloud access key the ENI pool signs its API calls with:
// from eni_conf, from Terway's encrypted credential file (the addon token that ACK mounts at
// /var/addon/token-config), or from the standard environment variables.
package credential

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"
)

// Credential is an access key, optionally an STS token with an expiry.
type Credential struct {
	AccessKeyID     string
	AccessKeySecret string
	SecurityToken   string    // empty for a long-term access key
	Expiration      time.Time // zero for a long-term access key
	Source          string    // where it came from, for logs ("eni_conf", "file:/path", "env")
}

// Environment variable names the Alibaba Cloud SDKs and CLI read.
const (
	EnvAccessKeyID     = "ALIBABA_CLOUD_ACCESS_KEY_ID"
	EnvAccessKeySecret = "ALIBABA_CLOUD_ACCESS_KEY_SECRET"
	EnvSecurityToken   = "ALIBABA_CLOUD_SECURITY_TOKEN"
)

// ErrNoCredential means no source yielded an access key.
var ErrNoCredential = errors.New("no Alibaba Cloud credential: set access_key/access_secret or credential_path in eni_conf, or " + EnvAccessKeyID + "/" + EnvAccessKeySecret)

// Resolve picks the first source that is set: the explicit key pair, then credentialPath, then the
// environment (through getenv, so tests need not touch the process environment).
func Resolve(accessKey, accessSecret, credentialPath string, getenv func(string) string) (Credential, error) {
	if accessKey != "" && accessSecret != "" {
		return Credential{AccessKeyID: accessKey, AccessKeySecret: accessSecret, Source: "eni_conf"}, nil
	}
	if credentialPath != "" {
		return LoadEncryptedFile(credentialPath)
	}
	if getenv == nil {
		getenv = os.Getenv
	}
	if id, secret := getenv(EnvAccessKeyID), getenv(EnvAccessKeySecret); id != "" && secret != "" {
		return Credential{AccessKeyID: id, AccessKeySecret: secret, SecurityToken: getenv(EnvSecurityToken), Source: "env"}, nil
	}
	return Credential{}, ErrNoCredential
}

// encryptedFile is the JSON layout of Terway's token file. Each secret field is
// base64(IV ‖ AES-CBC(PKCS#7-padded plaintext)) keyed by the raw bytes of `keyring`.
type encryptedFile struct {
	AccessKeyID     string `json:"access.key.id"`
	AccessKeySecret string `json:"access.key.secret"`
	SecurityToken   string `json:"security.token"`
	Expiration      string `json:"expiration"`
	Keyring         string `json:"keyring"`
}

// expirationLayout is the UTC timestamp format of the file's `expiration`.
const expirationLayout = "2006-01-02T15:04:05Z"

// LoadEncryptedFile reads and decrypts a Terway-format credential file. The file is rotated by
// the platform; callers re-read it before Expiration.
func LoadEncryptedFile(path string) (Credential, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Credential{}, fmt.Errorf("read credential file %s: %w (check credential_path in eni_conf and the volume mount)", path, err)
	}
	var f encryptedFile
	if err := json.Unmarshal(data, &f); err != nil {
		return Credential{}, fmt.Errorf("credential file %s is not JSON: %w", path, err)
	}
	key := []byte(f.Keyring)
	var c Credential
	for _, fld := range []struct {
		name string
		in   string
		out  *string
	}{
		{"access.key.id", f.AccessKeyID, &c.AccessKeyID},
		{"access.key.secret", f.AccessKeySecret, &c.AccessKeySecret},
		{"security.token", f.SecurityToken, &c.SecurityToken},
	} {
		plain, err := Decrypt(fld.in, key)
		if err != nil {
			return Credential{}, fmt.Errorf("credential file %s: field %s: %w", path, fld.name, err)
		}
		*fld.out = string(plain)
	}
	if f.Expiration != "" {
		t, err := time.Parse(expirationLayout, f.Expiration)
		if err != nil {
			return Credential{}, fmt.Errorf("credential file %s: expiration %q is not %s: %w", path, f.Expiration, expirationLayout, err)
		}
		c.Expiration = t
	}
	if c.AccessKeyID == "" || c.AccessKeySecret == "" {
		return Credential{}, fmt.Errorf("credential file %s: access.key.id or access.key.secret is empty", path)
	}
	c.Source = "file:" + path
	return c, nil
}

// Decrypt reverses Encrypt.
func Decrypt(b64 string, key []byte) ([]byte, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("keyring is not a valid AES key (%d bytes; need 16, 24 or 32): %w", len(key), err)
	}
	data, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, fmt.Errorf("not base64: %w", err)
	}
	bs := block.BlockSize()
	if len(data) < 2*bs || len(data)%bs != 0 {
		return nil, fmt.Errorf("ciphertext length %d is not IV plus whole %d-byte blocks", len(data), bs)
	}
	iv, ct := data[:bs], data[bs:]
	out := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, iv).CryptBlocks(out, ct)
	pad := int(out[len(out)-1])
	if pad == 0 || pad > bs || !bytes.Equal(out[len(out)-pad:], bytes.Repeat([]byte{byte(pad)}, pad)) {
		return nil, errors.New("bad padding: wrong keyring or corrupted value")
	}
	return out[:len(out)-pad], nil
}

// Encrypt produces the file's field format with the given IV; for tests and tooling.
func Encrypt(plain, key, iv []byte) (string, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return "", err
	}
	bs := block.BlockSize()
	if len(iv) != bs {
		return "", fmt.Errorf("IV must be %d bytes, got %d", bs, len(iv))
	}
	pad := bs - len(plain)%bs
	buf := append(append([]byte(nil), plain...), bytes.Repeat([]byte{byte(pad)}, pad)...)
	out := make([]byte, bs+len(buf))
	copy(out, iv)
	cipher.NewCBCEncrypter(block, iv).CryptBlocks(out[bs:], buf)
	return base64.StdEncoding.EncodeToString(out), nil
}
