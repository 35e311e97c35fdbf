package aliyun

import "regexp"

// signedParams matches the request parameters that identify the caller or prove its
// signature. The SDK's transport errors quote the whole signed URL; the secret is never in
// it, but the key ID, a valid signature and an STS token do not belong in logs either.
var signedParams = regexp.MustCompile(`(?i)\b(AccessKeyId|Signature|SecurityToken|SignatureNonce)=[^&"\s]*`)

// redactSigned replaces the values of the signing parameters in s with "REDACTED".
func redactSigned(s string) string { return signedParams.ReplaceAllString(s, "$1=REDACTED") }
