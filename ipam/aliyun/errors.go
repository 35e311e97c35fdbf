package aliyun

import (
	"errors"
	"fmt"
	"net"
	"strings"

	sdkerrors "github.com/aliyun/alibaba-cloud-sdk-go/sdk/errors"
)

// Causes the pool acts on. Test with errors.Is; an *APIError carries the cloud's code and
// RequestId as well.
var (
	// ErrVSwitchExhausted: the vSwitch has no free addresses (InvalidVSwitchId.IpNotEnough,
	// QuotaExceeded.PrivateIpAddress). Use another vSwitch.
	ErrVSwitchExhausted = errors.New("vSwitch has no free IP addresses")
	// ErrQuota: an instance or ENI limit was reached (EniPerInstanceLimitExceeded,
	// InvalidOperation.Ipv4CountExceeded, other QuotaExceeded.*).
	ErrQuota = errors.New("cloud quota exceeded")
	// ErrCredentials: the access key is wrong or unknown (SignatureDoesNotMatch,
	// InvalidAccessKeyId.*). Fix the credential; retrying does not help.
	ErrCredentials = errors.New("cloud credentials rejected")
	// ErrForbidden: the key lacks a RAM permission (Forbidden*, NoPermission).
	ErrForbidden = errors.New("cloud permission denied")
	// ErrBadVSwitch: eni_conf names a vSwitch the cloud does not know or accept
	// (InvalidVSwitchId.NotFound, …; not IpNotEnough, which is ErrVSwitchExhausted).
	ErrBadVSwitch = errors.New("eni_conf names a vSwitch the cloud does not know")
	// ErrNotFound: the named resource does not exist (*.NotFound).
	ErrNotFound = errors.New("cloud resource not found")
	// ErrInvalidState: the resource is in the wrong state for the call
	// (InvalidOperation.InvalidEniState, IncorrectInstanceStatus).
	ErrInvalidState = errors.New("cloud resource in the wrong state")
	// ErrThrottled: rate limited and still limited after the retries.
	ErrThrottled = errors.New("cloud API throttled")
	// ErrTransient: a retryable failure (InternalError, 5xx, timeouts) that outlived the retries.
	ErrTransient = errors.New("transient cloud failure")
	// ErrTimeout: an asynchronous ENI or route entry transition did not finish within the wait.
	ErrTimeout = errors.New("timed out waiting for the ENI or route entry state")
	// ErrConflict: the resource already exists (a route table entry for the same destination:
	// InvalidCIDRBlock.Duplicate, InvalidRouteEntry.Duplicate, RouterEntryConflict.Duplicated).
	ErrConflict = errors.New("cloud resource already exists")
	// ErrAddressInUse: an address asked for by name is still assigned in the VPC
	// (InvalidPrivateIpAddress.Duplicated, InvalidIPAddress.AlreadyUsed). After an unassign
	// elsewhere this clears within seconds: retry with backoff.
	ErrAddressInUse = errors.New("private IP address is still in use in the VPC")
	// ErrBadAddress: an address asked for by name is not a usable address of the ENI's vSwitch
	// (InvalidPrivateIpAddress, InvalidPrivateIpAddress.Malformed, .Mismatch).
	ErrBadAddress = errors.New("private IP address is not usable in the ENI's vSwitch")
	// ErrBadRoute: the cloud refuses a route entry's destination (InvalidCidrBlock*: it
	// overlaps a vSwitch of the VPC or 100.64.0.0/10, or is malformed). Only another pod CIDR
	// fixes it.
	ErrBadRoute = errors.New("cloud refuses the route destination")
)

// APIError is a failed OpenAPI call.
type APIError struct {
	Action     string
	Code       string // the cloud's error code, or the SDK's client error code
	RequestID  string
	HTTPStatus int
	Message    string
	Attempts   int
	cause      error // one of the Err* sentinels, or nil
	err        error // the SDK error
}

func (e *APIError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s failed", e.Action)
	if e.Code != "" {
		fmt.Fprintf(&b, ": %s", e.Code)
	}
	if e.HTTPStatus != 0 {
		fmt.Fprintf(&b, " (HTTP %d)", e.HTTPStatus)
	}
	if e.Message != "" {
		fmt.Fprintf(&b, ": %s", e.Message)
	}
	if e.RequestID != "" {
		fmt.Fprintf(&b, " [RequestId %s]", e.RequestID)
	}
	if e.Attempts > 1 {
		fmt.Fprintf(&b, " after %d attempts", e.Attempts)
	}
	if hint := hintFor(e.cause); hint != "" {
		fmt.Fprintf(&b, "; %s", hint)
	}
	return b.String()
}

// Unwrap exposes the cause sentinel and the SDK error to errors.Is/As.
func (e *APIError) Unwrap() []error {
	var out []error
	if e.cause != nil {
		out = append(out, e.cause)
	}
	if e.err != nil {
		out = append(out, e.err)
	}
	return out
}

func hintFor(cause error) string {
	switch cause {
	case ErrCredentials:
		return "check access_key/access_secret or credential_path in eni_conf"
	case ErrForbidden:
		return "grant the RAM policy the ECS/VPC ENI actions"
	case ErrVSwitchExhausted:
		return "add a vSwitch with free addresses to eni_conf vswitches"
	case ErrQuota:
		return "the instance, route table or account limit is reached"
	case ErrBadRoute:
		return "give the node a pod CIDR outside every vSwitch of the VPC and outside 100.64.0.0/10"
	}
	return ""
}

// classify maps an SDK error to an *APIError and says whether a retry may succeed.
func classify(action string, err error) (*APIError, bool) {
	ae := &APIError{Action: action, err: err}
	var se *sdkerrors.ServerError
	var ce *sdkerrors.ClientError
	switch {
	case errors.As(err, &se):
		ae.Code, ae.RequestID, ae.HTTPStatus, ae.Message = se.ErrorCode(), se.RequestId(), se.HttpStatus(), se.Message()
	case errors.As(err, &ce):
		ae.Code, ae.Message = ce.ErrorCode(), ce.Message()
		if ce.OriginError() != nil {
			ae.Message = ce.OriginError().Error()
		}
	default:
		ae.Message = err.Error()
	}
	ae.Message = redactSigned(ae.Message)
	code := ae.Code
	switch {
	case code == "InvalidVSwitchId.IpNotEnough" || code == "QuotaExceeded.PrivateIpAddress":
		ae.cause = ErrVSwitchExhausted
	case code == "EniPerInstanceLimitExceeded" || code == "InvalidOperation.Ipv4CountExceeded" ||
		strings.HasPrefix(code, "QuotaExceeded"):
		ae.cause = ErrQuota
	case code == "InvalidPrivateIpAddress.Duplicated" || code == "InvalidIPAddress.AlreadyUsed":
		ae.cause = ErrAddressInUse
	case code == "InvalidPrivateIpAddress" || strings.HasPrefix(code, "InvalidPrivateIpAddress."):
		ae.cause = ErrBadAddress
	case code == "SignatureDoesNotMatch" || strings.HasPrefix(code, "InvalidAccessKeyId") ||
		strings.HasPrefix(code, "InvalidSecurityToken"):
		ae.cause = ErrCredentials
	case strings.HasPrefix(code, "Forbidden") || code == "NoPermission":
		ae.cause = ErrForbidden
	case strings.HasPrefix(code, "InvalidVSwitchId"):
		// Only a change of eni_conf fixes a vSwitch the cloud does not know.
		ae.cause = ErrBadVSwitch
	case strings.HasSuffix(code, ".NotFound"):
		ae.cause = ErrNotFound
	case code == "InvalidCIDRBlock.Duplicate" || code == "InvalidRouteEntry.Duplicate" || code == "RouterEntryConflict.Duplicated":
		ae.cause = ErrConflict
	case strings.HasPrefix(code, "InvalidCidrBlock"):
		ae.cause = ErrBadRoute
	case code == "IncorrectRouteEntryStatus" || code == "TaskConflict" || code == "LastTokenProcessing":
		// Another entry of the table is Pending (the table takes one change at a time): it
		// settles within seconds.
		ae.cause = ErrTransient
		return ae, true
	case code == "InvalidOperation.InvalidEniState" || code == "IncorrectInstanceStatus" || code == "IncorrectVSwitchStatus":
		ae.cause = ErrInvalidState
	case strings.HasPrefix(code, "Throttling"):
		ae.cause = ErrThrottled
		return ae, true
	case code == "InternalError" || code == "ServiceUnavailable" || code == "Operation.Conflict" ||
		code == "OperationConflict" || strings.HasPrefix(code, "UnknownError"):
		ae.cause = ErrTransient
		return ae, true
	case ae.HTTPStatus >= 500:
		ae.cause = ErrTransient
		return ae, true
	case se == nil && isNetworkError(err, code):
		ae.cause = ErrTransient
		return ae, true
	}
	return ae, false
}

// isNetworkError recognises SDK client errors for unreachable endpoints and timeouts.
func isNetworkError(err error, code string) bool {
	switch code {
	case sdkerrors.TimeoutErrorCode, "SDK.ServerUnreachable":
		return true
	}
	var ne net.Error
	return errors.As(err, &ne)
}

func asAPIError(err error, target **APIError) bool { return errors.As(err, target) }

func isNotFound(err error) bool { return err != nil && errors.Is(err, ErrNotFound) }

func isInvalidState(err error) bool { return err != nil && errors.Is(err, ErrInvalidState) }
