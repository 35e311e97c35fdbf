package aliyun

import (
	"errors"
	"net/url"
	"strings"
	"testing"
)

func TestTransportErrorsDoNotCarryTheSignedURL(t *testing.T) {
	u := "http://127.0.0.1:1/?AccessKeyId=LTAIsecretid&Action=DescribeNetworkInterfaces&Signature=abc%2Bdef%3D&SignatureNonce=n1&SecurityToken=tok"
	err := &url.Error{Op: "Post", URL: u, Err: errors.New("dial tcp 127.0.0.1:1: connect: connection refused")}
	ae, _ := classify("DescribeNetworkInterfaces", err)
	msg := ae.Error()
	for _, leak := range []string{"LTAIsecretid", "abc%2Bdef%3D", "tok", "n1&"} {
		if strings.Contains(msg, leak) {
			t.Fatalf("error text leaks %q: %s", leak, msg)
		}
	}
	if !strings.Contains(msg, "AccessKeyId=REDACTED") || !strings.Contains(msg, "Action=DescribeNetworkInterfaces") ||
		!strings.Contains(msg, "connection refused") {
		t.Fatalf("error text lost what an operator needs: %s", msg)
	}
}
