package eniconfig

import (
	"errors"
	"strings"
	"testing"
	"time"
)

const terwayExample = `{
  "version": "1",
  "max_pool_size": 25,
  "min_pool_size": 10,
  "credential_path": "/var/addon/token-config",
  "vswitches": {"cn-hangzhou-i": ["vsw-aaa", "vsw-bbb"], "cn-hangzhou-k": ["vsw-ccc"]},
  "eni_tags": {"team": "net"},
  "service_cidr": "172.21.0.0/20",
  "security_group": "sg-111",
  "security_groups": ["sg-111", "sg-222"],
  "vswitch_selection_policy": "ordered",
  "ip_stack": "ipv4",
  "idle_ip_reclaim_after": "30m",
  "enable_eni_trunking": false,
  "kube_client_qps": 20
}`

func TestParseTerwayConfig(t *testing.T) {
	c, warnings, err := Parse([]byte(terwayExample))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if c.MaxPoolSize != 25 || c.MinPoolSize != 10 {
		t.Errorf("pool sizes = %d/%d, want 25/10", c.MaxPoolSize, c.MinPoolSize)
	}
	if got := strings.Join(c.SecurityGroups, ","); got != "sg-111,sg-222" {
		t.Errorf("security groups merged = %q, want sg-111,sg-222 (de-duplicated, in order)", got)
	}
	if got := strings.Join(c.VSwitchesInZone("cn-hangzhou-i"), ","); got != "vsw-aaa,vsw-bbb" {
		t.Errorf("zone i vSwitches = %q", got)
	}
	if c.IdleIPReclaimAfter != 30*time.Minute {
		t.Errorf("idle_ip_reclaim_after = %v, want 30m", c.IdleIPReclaimAfter)
	}
	if c.VSwitchSelection != VSwitchOrdered || c.ENISelection != ENIMostIPs || !c.HotPlug {
		t.Errorf("policies = %q/%q hot_plug=%v", c.VSwitchSelection, c.ENISelection, c.HotPlug)
	}
	if c.ServiceCIDR.String() != "172.21.0.0/20" {
		t.Errorf("service_cidr = %v", c.ServiceCIDR)
	}
	// Unknown fields are tolerated with a warning naming each.
	joined := strings.Join(warnings, "\n")
	for _, f := range []string{`"version"`, `"kube_client_qps"`} {
		if !strings.Contains(joined, f) {
			t.Errorf("no warning for unknown field %s in %q", f, joined)
		}
	}
}

func TestParseDefaults(t *testing.T) {
	c, _, err := Parse([]byte(`{"vswitches":{"z":["vsw-1"]},"security_group":"sg-1"}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.MaxPoolSize != 5 || c.MinPoolSize != 0 || c.VSwitchSelection != VSwitchRandom || c.IPStack != "ipv4" || !c.HotPlug {
		t.Errorf("defaults wrong: %+v", c)
	}
	c, _, err = Parse([]byte(`{"vswitches":{"z":["vsw-1"]},"security_group":"sg-1","hot_plug":false,"max_pool_size":0}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.HotPlug || c.MaxPoolSize != 0 {
		t.Errorf("explicit hot_plug=false / max_pool_size=0 not honoured: %+v", c)
	}
}

func TestParseValidation(t *testing.T) {
	base := `"vswitches":{"z":["vsw-1"]},"security_group":"sg-1"`
	tests := []struct {
		name, doc, field, wantInMsg string
	}{
		{"min above max", `{` + base + `,"max_pool_size":3,"min_pool_size":4}`, "min_pool_size", "at most max_pool_size (3)"},
		{"negative max", `{` + base + `,"max_pool_size":-1}`, "max_pool_size", "≥ 0"},
		{"no vswitches", `{"security_group":"sg-1"}`, "vswitches", "zone ID"},
		{"empty zone list", `{"vswitches":{"z":[]},"security_group":"sg-1"}`, "vswitches.z", "at least one"},
		{"bad vswitch id", `{"vswitches":{"z":["sw-1"]},"security_group":"sg-1"}`, "vswitches.z", `"vsw-"`},
		{"no security group", `{"vswitches":{"z":["vsw-1"]}}`, "security_group/security_groups", "at least one"},
		{"too many security groups", `{"vswitches":{"z":["vsw-1"]},"security_groups":["sg-1","sg-2","sg-3","sg-4","sg-5","sg-6","sg-7","sg-8","sg-9","sg-10","sg-11"]}`, "security_groups", "at most 10"},
		{"bad policy", `{` + base + `,"vswitch_selection_policy":"most"}`, "vswitch_selection_policy", `"random" or "ordered"`},
		{"bad eni policy", `{` + base + `,"eni_selection_policy":"x"}`, "eni_selection_policy", "most_ips"},
		{"dual stack", `{` + base + `,"ip_stack":"dual"}`, "ip_stack", "ipv4"},
		{"crd ipam", `{` + base + `,"ipam_type":"crd"}`, "ipam_type", "not supported"},
		{"bad duration", `{` + base + `,"idle_ip_reclaim_after":"soon"}`, "idle_ip_reclaim_after", "duration"},
		{"bad cidr", `{` + base + `,"service_cidr":"10.0.0.0/33"}`, "service_cidr", "CIDR"},
		{"half key", `{` + base + `,"access_key":"a"}`, "access_key/access_secret", "both set"},
		{"reserved tag", `{` + base + `,"eni_tags":{"acs:x":"y"}}`, "eni_tags", "reserved"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := Parse([]byte(tc.doc))
			if err == nil {
				t.Fatal("Parse accepted an invalid config")
			}
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("error %v is not a *ValidationError", err)
			}
			found := false
			for _, e := range unjoin(err) {
				if errors.As(e, &ve) && ve.Field == tc.field && strings.Contains(ve.Error(), tc.wantInMsg) {
					found = true
				}
			}
			if !found {
				t.Errorf("error %q does not name field %q with %q", err, tc.field, tc.wantInMsg)
			}
		})
	}
}

func TestParseNotJSON(t *testing.T) {
	if _, _, err := Parse([]byte(`{"vswitches":`)); err == nil || !strings.Contains(err.Error(), "not valid JSON") {
		t.Fatalf("err = %v, want a JSON error", err)
	}
}

func TestParseDurationNumberIsSeconds(t *testing.T) {
	c, _, err := Parse([]byte(`{"vswitches":{"z":["vsw-1"]},"security_group":"sg-1","idle_ip_reclaim_after":90}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.IdleIPReclaimAfter != 90*time.Second {
		t.Errorf("got %v, want 90s", c.IdleIPReclaimAfter)
	}
}

func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// Found by FuzzParse: eni_tags problems came out in map order, so one document gave a
// different report on each reload.
func TestParseReportsTagProblemsInKeyOrder(t *testing.T) {
	doc := []byte(`{"vswitches":{"z":["vsw-a"]},"security_group":"sg-1","eni_tags":{"aliyun-a":"1","acs:b":"2","":"3","aliyun-c":"4"}}`)
	_, _, first := Parse(doc)
	if first == nil {
		t.Fatal("reserved tag keys accepted")
	}
	for range 20 {
		if _, _, err := Parse(doc); err.Error() != first.Error() {
			t.Fatalf("report changed between runs:\n%v\n%v", first, err)
		}
	}
	if i, j := strings.Index(first.Error(), `"acs:b"`), strings.Index(first.Error(), `"aliyun-a"`); i < 0 || j < i {
		t.Fatalf("tag problems not in key order:\n%v", first)
	}
}
