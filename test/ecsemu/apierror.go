package ecsemu

import (
	"fmt"
	"net/http"
)

// APIError is an OpenAPI error reply: the SDK turns it into *errors.ServerError whose
// ErrorCode() is Code. Status is the HTTP status the real service uses for that code.
type APIError struct {
	Status  int
	Code    string
	Message string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("%s (HTTP %d): %s", e.Code, e.Status, e.Message)
}

func apiErr(status int, code, format string, args ...any) *APIError {
	return &APIError{Status: status, Code: code, Message: fmt.Sprintf(format, args...)}
}

// Error codes the emulator returns. The names are the real service's.
const (
	CodeSignatureDoesNotMatch   = "SignatureDoesNotMatch"
	CodeInvalidAccessKeyID      = "InvalidAccessKeyId.NotFound"
	CodeSignatureNonceUsed      = "SignatureNonceUsed"
	CodeInvalidSecurityToken    = "InvalidSecurityToken.Mismatch"
	CodeInvalidTimeStamp        = "InvalidTimeStamp.Expired"
	CodeMissingParameter        = "MissingParameter"
	CodeInvalidParameter        = "InvalidParameter"
	CodeInvalidAction           = "InvalidAction.NotFound"
	CodeUnsupportedVersion      = "UnsupportedVersion"
	CodeThrottling              = "Throttling"
	CodeInternalError           = "InternalError"
	CodeServiceUnavailable      = "ServiceUnavailable"
	CodeOperationConflict       = "Operation.Conflict"
	CodeInstanceNotFound        = "InvalidInstanceId.NotFound"
	CodeEniNotFound             = "InvalidEniId.NotFound"
	CodeVSwitchNotFound         = "InvalidVSwitchId.NotFound"
	CodeSecurityGroupNotFound   = "InvalidSecurityGroupId.NotFound"
	CodeVSwitchIPNotEnough      = "InvalidVSwitchId.IpNotEnough"
	CodeEniPerInstanceLimit     = "EniPerInstanceLimitExceeded"
	CodeInvalidEniState         = "InvalidOperation.InvalidEniState"
	CodeIpv4CountExceeded       = "InvalidOperation.Ipv4CountExceeded"
	CodeQuotaPrivateIP          = "QuotaExceeded.PrivateIpAddress"
	CodeIPUnassigned            = "InvalidIp.IpUnassigned"
	CodeIPAddressAlreadyUsed    = "InvalidPrivateIpAddress.Duplicated"
	CodeIPNotInVSwitch          = "InvalidPrivateIpAddress"
	CodeIPMalformed             = "InvalidPrivateIpAddress.Malformed"
	CodeInvalidOperationPrimary = "InvalidOperation.DetachPrimaryEniNotAllowed"
	CodeEniZoneMismatch         = "InvalidOperation.EniZoneMismatch"
	CodeInvalidEniType          = "InvalidOperation.InvalidEniType"
	CodeIdempotentMismatch      = "IdempotentParameterMismatch"
)

// statusOf gives the HTTP status for a code injected as a fault, so a fault behaves like the
// real error. Throttling is a 400 in Alibaba Cloud's RPC APIs (so the SDK does not retry it).
func statusOf(code string) int {
	switch code {
	case CodeInternalError:
		return http.StatusInternalServerError
	case CodeServiceUnavailable:
		return http.StatusServiceUnavailable
	case CodeInstanceNotFound, CodeEniNotFound, CodeVSwitchNotFound, CodeSecurityGroupNotFound,
		CodeInvalidAccessKeyID, CodeInvalidAction:
		return http.StatusNotFound
	case CodeEniPerInstanceLimit, CodeInvalidEniState, CodeIpv4CountExceeded,
		CodeVSwitchIPNotEnough, CodeInvalidOperationPrimary, CodeIPUnassigned,
		CodeInvalidEniType, CodeEniZoneMismatch:
		return http.StatusForbidden
	case CodeOperationConflict:
		return http.StatusConflict
	default:
		return http.StatusBadRequest
	}
}
