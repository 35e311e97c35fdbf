package loader_test

import (
	"testing"

	"github.com/cilium/ebpf/btf"

	"github.com/tern-net/tern/loader"
)

// Every reason in the C enum needs a metrics label, or drops would be exported as
// "unknown".
func TestEveryReasonHasALabel(t *testing.T) {
	spec, err := loader.LoadPod()
	if err != nil {
		t.Fatal(err)
	}
	var enum *btf.Enum
	if err := spec.Types.TypeByName("tern_reason", &enum); err != nil {
		t.Fatalf("enum tern_reason not in BTF: %v", err)
	}
	for _, v := range enum.Values {
		if v.Name == "__REASON_MAX" {
			continue
		}
		if loader.Reason(v.Value).String() == "unknown" {
			t.Errorf("%s (%d) has no label in reasons.go", v.Name, v.Value)
		}
	}
}
