package ecsemu

import (
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aliyun/alibaba-cloud-sdk-go/services/ecs"
)

// rawCall signs params by hand (the SDK's recipe, independently of the server's check) and
// sends them the given way: "query" (POST /?params, the SDK's way), "form" (POST body) or
// "get".
func rawCall(t *testing.T, addr, how string, params map[string]string) (int, map[string]any) {
	t.Helper()
	p := map[string]string{
		"Format": "JSON", "Version": ECSVersion, "RegionId": TestRegion, "AccessKeyId": TestAccessKeyID,
		"SignatureMethod": "HMAC-SHA1", "SignatureVersion": "1.0",
		"Timestamp": time.Now().UTC().Format(timestampLayout),
	}
	for k, v := range params {
		p[k] = v
	}
	method := http.MethodPost
	if how == "get" {
		method = http.MethodGet
	}
	p["Signature"] = Sign(StringToSign(method, p), TestAccessKeySecret)
	v := url.Values{}
	for k, val := range p {
		v.Set(k, val)
	}
	var req *http.Request
	var err error
	switch how {
	case "form":
		req, err = http.NewRequest(method, "http://"+addr+"/", strings.NewReader(v.Encode()))
		if err == nil {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
	default:
		req, err = http.NewRequest(method, "http://"+addr+"/?"+v.Encode(), nil)
	}
	must(t, err)
	resp, err := http.DefaultClient.Do(req)
	must(t, err)
	defer resp.Body.Close()
	var body map[string]any
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &body); err != nil {
		t.Fatalf("reply %q is not JSON: %v", b, err)
	}
	return resp.StatusCode, body
}

func TestRawTransportsAndNonce(t *testing.T) {
	_, addr := NewTestServer(t, TestConfig())
	for _, how := range []string{"query", "form", "get"} {
		status, body := rawCall(t, addr, how, map[string]string{"Action": "DescribeInstanceTypes", "SignatureNonce": "n-" + how})
		if status != 200 || body["InstanceTypes"] == nil || body["RequestId"] == "" {
			t.Fatalf("%s: HTTP %d %v", how, status, body)
		}
	}
	status, body := rawCall(t, addr, "query", map[string]string{"Action": "DescribeInstanceTypes", "SignatureNonce": "n-query"})
	if status != 400 || body["Code"] != CodeSignatureNonceUsed {
		t.Fatalf("reused nonce: HTTP %d %v", status, body)
	}
	status, body = rawCall(t, addr, "query", map[string]string{"Action": "DescribeInstanceTypes", "SignatureNonce": "n-old",
		"Timestamp": time.Now().Add(-20 * time.Minute).UTC().Format(timestampLayout)})
	if status != 400 || body["Code"] != CodeInvalidTimeStamp {
		t.Fatalf("stale timestamp: HTTP %d %v", status, body)
	}
	status, body = rawCall(t, addr, "query", map[string]string{"Action": "RunInstances", "SignatureNonce": "n-unknown"})
	if status != 404 || body["Code"] != CodeInvalidAction {
		t.Fatalf("unknown action: HTTP %d %v", status, body)
	}
	for _, k := range []string{"RequestId", "HostId", "Code", "Message", "Recommend"} {
		if _, ok := body[k]; !ok {
			t.Errorf("error reply lacks %s: %v", k, body)
		}
	}
}

func TestClockSkewThroughSDK(t *testing.T) {
	_, addr := NewTestServer(t, TestConfig(), WithClock(func() time.Time { return time.Now().Add(time.Hour) }))
	c, _ := NewTestClients(t, addr)
	_, err := c.DescribeInstanceTypes(ecs.CreateDescribeInstanceTypesRequest())
	wantCode(t, err, CodeInvalidTimeStamp)
}

func TestFaultCount(t *testing.T) {
	e, addr := NewTestServer(t, TestConfig())
	c, _ := NewTestClients(t, addr)
	id := createENI(t, c, "vsw-test-a", nil).NetworkInterfaceId
	e.InjectFault(Fault{Action: "AssignPrivateIpAddresses", Code: CodeThrottling, Count: 2})
	for i := range 2 {
		_, err := assignN(c, id, 1, "")
		se := wantCode(t, err, CodeThrottling)
		if se.HttpStatus() != 400 {
			t.Fatalf("call %d: Throttling with HTTP %d, want 400", i, se.HttpStatus())
		}
	}
	// Other actions were never affected, and the fault is spent.
	describeENI(t, c, id)
	if _, err := assignN(c, id, 1, ""); err != nil {
		t.Fatalf("third call after a Count=2 fault: %v", err)
	}
	s := e.Snapshot()
	if len(s.Faults) != 0 || s.Errors[CodeThrottling] != 2 || s.Calls["AssignPrivateIpAddresses"] != 3 {
		t.Fatalf("faults %v errors %v calls %v", s.Faults, s.Errors, s.Calls)
	}
	if st, _ := s.ENI(id); len(st.IPs) != 2 {
		t.Fatalf("throttled calls changed state: ENI holds %d IPs, want 2", len(st.IPs))
	}
}

func TestFaultRate(t *testing.T) {
	e, addr := NewTestServer(t, TestConfig(), WithSeed(42))
	c, _ := NewTestClients(t, addr)
	e.InjectFault(Fault{Code: CodeThrottling, Rate: 0.3})
	const n = 300
	failed := 0
	for range n {
		if _, err := c.DescribeInstanceTypes(ecs.CreateDescribeInstanceTypesRequest()); err != nil {
			wantCode(t, err, CodeThrottling)
			failed++
		}
	}
	// Binomial(300, 0.3): mean 90, sd ≈ 7.9; the bounds are about ±4 sd.
	if failed < 58 || failed > 122 {
		t.Fatalf("%d of %d calls throttled at rate 0.3", failed, n)
	}
	e.ClearFaults()
	if _, err := c.DescribeInstanceTypes(ecs.CreateDescribeInstanceTypesRequest()); err != nil {
		t.Fatalf("after ClearFaults: %v", err)
	}
}

func TestFaultsOverHTTP(t *testing.T) {
	_, addr := NewTestServer(t, TestConfig())
	c, _ := NewTestClients(t, addr)
	resp, err := http.Post("http://"+addr+"/_emulator/faults", "application/json",
		strings.NewReader(`{"action":"DescribeInstanceTypes","code":"InternalError"}`))
	must(t, err)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("POST fault: HTTP %d", resp.StatusCode)
	}
	_, err = c.DescribeInstanceTypes(ecs.CreateDescribeInstanceTypesRequest())
	if se := wantCode(t, err, CodeInternalError); se.HttpStatus() != 500 {
		t.Fatalf("InternalError with HTTP %d, want 500", se.HttpStatus())
	}
	req, _ := http.NewRequest(http.MethodDelete, "http://"+addr+"/_emulator/faults", nil)
	resp, err = http.DefaultClient.Do(req)
	must(t, err)
	resp.Body.Close()
	if _, err := c.DescribeInstanceTypes(ecs.CreateDescribeInstanceTypesRequest()); err != nil {
		t.Fatalf("after DELETE /_emulator/faults: %v", err)
	}

	resp, err = http.Get("http://" + addr + "/_emulator/state")
	must(t, err)
	var st State
	must(t, json.NewDecoder(resp.Body).Decode(&st))
	resp.Body.Close()
	if st.Calls["DescribeInstanceTypes"] != 2 || st.Errors[CodeInternalError] != 1 || len(st.ENIs) != 1 {
		t.Fatalf("state over HTTP: calls %v errors %v enis %d", st.Calls, st.Errors, len(st.ENIs))
	}
}

func TestLatency(t *testing.T) {
	e, addr := NewTestServer(t, TestConfig())
	c, _ := NewTestClients(t, addr)
	e.SetLatency(150 * time.Millisecond)
	start := time.Now()
	_, err := c.DescribeInstanceTypes(ecs.CreateDescribeInstanceTypesRequest())
	must(t, err)
	// A lower bound only: the emulator must wait at least the latency; how much longer a loaded
	// machine takes is not this test's business.
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Fatalf("call took %s with 150ms latency set", d)
	}
	resp, err := http.Get("http://" + addr + "/_emulator/latency")
	must(t, err)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(b), "150ms") {
		t.Fatalf("GET /_emulator/latency = %s", b)
	}
}

func getMeta(t *testing.T, addr, inst, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/_emulator/metadata/" + inst + "/latest/meta-data/" + path)
	must(t, err)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestMetadataReflectsAttach(t *testing.T) {
	cfg := TestConfig()
	cfg.Delays.Attach = Duration(time.Hour) // hold the ENI in Attaching to see it is not yet listed
	e, addr := NewTestServer(t, cfg)
	c, _ := NewTestClients(t, addr)

	for path, want := range map[string]string{
		"instance-id": "i-test-0001", "region-id": TestRegion, "zone-id": "cn-hangzhou-h",
		"vswitch-id": "vsw-test-a", "vpc-id": "vpc-test", "private-ipv4": "192.168.1.10",
	} {
		if code, got := getMeta(t, addr, "i-test-0001", path); code != 200 || got != want {
			t.Errorf("%s: HTTP %d %q, want %q", path, code, got, want)
		}
	}
	_, primaryMAC := getMeta(t, addr, "i-test-0001", "mac")
	if _, macs := getMeta(t, addr, "i-test-0001", "network/interfaces/macs/"); macs != primaryMAC+"/" {
		t.Fatalf("macs before attach = %q, want only the primary %s", macs, primaryMAC)
	}

	created := createENI(t, c, "vsw-test-b", nil)
	must(t, attach(t, c, "i-test-0001", created.NetworkInterfaceId))
	if _, macs := getMeta(t, addr, "i-test-0001", "network/interfaces/macs/"); strings.Contains(macs, created.MacAddress) {
		t.Fatalf("an Attaching ENI is already listed: %q", macs)
	}
	e.FinishTransitions()
	waitStatus(t, c, created.NetworkInterfaceId, StatusInUse)
	_, macs := getMeta(t, addr, "i-test-0001", "network/interfaces/macs/")
	if !slices.Equal(strings.Split(macs, "\n"), []string{primaryMAC + "/", created.MacAddress + "/"}) {
		t.Fatalf("macs after attach = %q", macs)
	}
	resp, err := assignN(c, created.NetworkInterfaceId, 2, "")
	must(t, err)
	base := "network/interfaces/macs/" + created.MacAddress + "/"
	for path, want := range map[string]string{
		"network-interface-id": created.NetworkInterfaceId, "primary-ip-address": created.PrivateIpAddress,
		"vswitch-id": "vsw-test-b", "vswitch-cidr-block": "192.168.2.0/24", "gateway": "192.168.2.253",
		"netmask":       "255.255.255.0",
		"private-ipv4s": `["` + strings.Join(append([]string{created.PrivateIpAddress}, resp.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress...), `","`) + `"]`,
	} {
		if code, got := getMeta(t, addr, "i-test-0001", base+path); code != 200 || got != want {
			t.Errorf("%s: HTTP %d %q, want %q", path, code, got, want)
		}
	}
	must(t, detach(c, "i-test-0001", created.NetworkInterfaceId))
	e.FinishTransitions()
	if _, macs := getMeta(t, addr, "i-test-0001", "network/interfaces/macs/"); macs != primaryMAC+"/" {
		t.Fatalf("macs after detach = %q, want only the primary", macs)
	}
	if code, _ := getMeta(t, addr, "i-test-0001", base+"gateway"); code != 404 {
		t.Fatalf("a detached ENI's metadata answers HTTP %d, want 404", code)
	}
	if code, _ := getMeta(t, addr, "i-nope", "instance-id"); code != 404 {
		t.Fatalf("metadata of an unknown instance answers HTTP %d, want 404", code)
	}
}

func TestMetadataLag(t *testing.T) {
	cfg := TestConfig()
	cfg.Delays.Metadata = Duration(time.Hour)
	e, addr := NewTestServer(t, cfg)
	c, _ := NewTestClients(t, addr)
	created := createENI(t, c, "vsw-test-a", nil)
	must(t, attach(t, c, "i-test-0001", created.NetworkInterfaceId))
	waitStatus(t, c, created.NetworkInterfaceId, StatusInUse)
	if _, macs := getMeta(t, addr, "i-test-0001", "network/interfaces/macs/"); strings.Contains(macs, created.MacAddress) {
		t.Fatalf("ENI visible in metadata despite a 1h lag: %q", macs)
	}
	e.SetDelays(TransitionDelays{})
	if _, macs := getMeta(t, addr, "i-test-0001", "network/interfaces/macs/"); !strings.Contains(macs, created.MacAddress) {
		t.Fatalf("ENI not in metadata once the lag is gone: %q", macs)
	}
}
