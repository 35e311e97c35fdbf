package ecsemu

import "testing"

// TestSpentFaultKeepsItsCode: a Count fault that is spent and removed still answers with its
// own code, not the code of the fault queued behind it.
func TestSpentFaultKeepsItsCode(t *testing.T) {
	e, addr := NewTestServer(t, TestConfig())
	c, _ := NewTestClients(t, addr)
	id := createENI(t, c, "vsw-test-a", nil).NetworkInterfaceId
	e.InjectFault(Fault{Action: "AssignPrivateIpAddresses", Code: CodeThrottling, Count: 1})
	e.InjectFault(Fault{Action: "AssignPrivateIpAddresses", Code: CodeInternalError, Count: 1})
	_, err := assignN(c, id, 1, "")
	wantCode(t, err, CodeThrottling)
	_, err = assignN(c, id, 1, "")
	wantCode(t, err, CodeInternalError)
}
