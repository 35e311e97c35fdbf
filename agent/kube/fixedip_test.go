package kube

import (
	"net/netip"
	"reflect"
	"testing"
	"time"

	"github.com/tern-net/tern/ipam/fixedip"
)

// A FixedIP record survives the trip through the custom resource's fields, and a record with
// a bad address is an error naming the record, not a zero address.
func TestFixedIPRecordRoundTrip(t *testing.T) {
	in := fixedip.Record{Namespace: "db", Name: "web-0", IP: netip.MustParseAddr("192.168.1.20"), VSwitchID: "vsw-a",
		ZoneID: "cn-hangzhou-h", Node: "node-2", PodUID: "uid-2", Phase: fixedip.PhaseMoving,
		PreviousNode: "node-1", PreviousENI: "eni-1", StatefulSet: "web", ResourceVersion: "42",
		ReleaseAfter: time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)}
	u := toUnstructured(in)
	if u.GetLabels()[labelFixedIPNode] != "node-2" || u.GetAPIVersion() != "tern.io/v1alpha1" || u.GetKind() != "FixedIP" {
		t.Fatalf("object %v", u.Object)
	}
	out, err := recordOf(u)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, out) {
		t.Fatalf("round trip\n%+v\nwant\n%+v", out, in)
	}
	u.Object["spec"].(map[string]any)["ip"] = "not-an-ip"
	if _, err := recordOf(u); err == nil {
		t.Fatal("a record with spec.ip not-an-ip was accepted")
	}
}
