package ecsemu

import (
	"crypto/hmac"
	"crypto/sha1"
	"encoding/base64"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// timestampLayout is the ISO 8601 form the SDK sends in Timestamp.
const timestampLayout = "2006-01-02T15:04:05Z"

// StringToSign builds the RPC signature v1 input: METHOD&%2F&percentEncode(canonical query),
// where the canonical query is every parameter except Signature, sorted, each key and value
// percent-encoded the way the SDK does it (query escaping, then "+"→"%20", "*"→"%2A",
// "%7E"→"~").
func StringToSign(method string, params map[string]string) string {
	v := url.Values{}
	for k, val := range params {
		if k == "Signature" {
			continue
		}
		v.Set(k, val)
	}
	canon := v.Encode() // sorted by key
	canon = strings.ReplaceAll(canon, "+", "%20")
	canon = strings.ReplaceAll(canon, "*", "%2A")
	canon = strings.ReplaceAll(canon, "%7E", "~")
	return method + "&%2F&" + url.QueryEscape(canon)
}

// Sign returns the base64 HMAC-SHA1 signature of stringToSign under secret (the key is
// secret + "&": there is no token secret in signature v1).
func Sign(stringToSign, secret string) string {
	m := hmac.New(sha1.New, []byte(secret+"&"))
	m.Write([]byte(stringToSign))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// authenticator checks signature, timestamp and nonce of each call.
type authenticator struct {
	skew time.Duration
	now  func() time.Time

	mu     sync.Mutex
	keys   map[string]AccessKey // AccessKeyId → key; replaced whole on rotation
	nonces map[string]time.Time // nonce → when it may be forgotten
}

func newAuthenticator(keys []AccessKey, skew time.Duration, now func() time.Time) *authenticator {
	a := &authenticator{skew: skew, now: now, nonces: map[string]time.Time{}}
	a.setKeys(keys)
	return a
}

// setKeys replaces the accepted keys: a key left out is refused from the next call on, as
// when the platform rotates an STS key or an operator disables an AccessKey.
func (a *authenticator) setKeys(keys []AccessKey) {
	m := make(map[string]AccessKey, len(keys))
	for _, k := range keys {
		m[k.ID] = k
	}
	a.mu.Lock()
	a.keys = m
	a.mu.Unlock()
}

// check verifies one call's parameters. It records the nonce only for calls whose signature
// is valid, so a forged call cannot burn a legitimate client's nonce.
func (a *authenticator) check(method string, p map[string]string) *APIError {
	for _, k := range []string{"AccessKeyId", "Signature", "SignatureNonce", "Timestamp"} {
		if p[k] == "" {
			return apiErr(http.StatusBadRequest, CodeMissingParameter, "The input parameter %q that is mandatory for processing this request is not supplied.", k)
		}
	}
	if m := p["SignatureMethod"]; m != "" && m != "HMAC-SHA1" {
		return apiErr(http.StatusBadRequest, "InvalidSignatureMethod", "SignatureMethod %q is not supported; use HMAC-SHA1.", m)
	}
	if v := p["SignatureVersion"]; v != "" && v != "1.0" {
		return apiErr(http.StatusBadRequest, "UnsupportedSignatureVersion", "SignatureVersion %q is not supported; use 1.0.", v)
	}
	a.mu.Lock()
	key, ok := a.keys[p["AccessKeyId"]]
	a.mu.Unlock()
	if !ok {
		return apiErr(http.StatusNotFound, CodeInvalidAccessKeyID, "Specified access key is not found: %s.", p["AccessKeyId"])
	}
	sts := StringToSign(method, p)
	want := Sign(sts, key.Secret)
	if !hmac.Equal([]byte(want), []byte(p["Signature"])) {
		return apiErr(http.StatusBadRequest, CodeSignatureDoesNotMatch,
			"Specified signature is not matched with our calculation. server string to sign is:%s", sts)
	}
	if key.SecurityToken != "" && p["SecurityToken"] != key.SecurityToken {
		return apiErr(http.StatusBadRequest, CodeInvalidSecurityToken, "Specified SecurityToken does not match the AccessKeyId %s.", key.ID)
	}
	ts, err := time.Parse(timestampLayout, p["Timestamp"])
	if err != nil {
		return apiErr(http.StatusBadRequest, "InvalidTimeStamp.Format", "Timestamp %q is not in the format yyyy-MM-ddTHH:mm:ssZ.", p["Timestamp"])
	}
	now := a.now()
	if d := now.Sub(ts); d > a.skew || d < -a.skew {
		return apiErr(http.StatusBadRequest, CodeInvalidTimeStamp, "Specified time stamp or date value is expired: %s is more than %s away from server time %s.", p["Timestamp"], a.skew, now.UTC().Format(timestampLayout))
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, used := a.nonces[p["SignatureNonce"]]; used {
		return apiErr(http.StatusBadRequest, CodeSignatureNonceUsed, "Specified signature nonce was used already: %s.", p["SignatureNonce"])
	}
	// A nonce only needs remembering while its timestamp is acceptable; forget older ones so
	// the map stays bounded by the request rate.
	if len(a.nonces) > 4096 {
		for n, exp := range a.nonces {
			if now.After(exp) {
				delete(a.nonces, n)
			}
		}
	}
	a.nonces[p["SignatureNonce"]] = ts.Add(2 * a.skew)
	return nil
}
