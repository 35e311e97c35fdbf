package ipam

import (
	"errors"
	"testing"

	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/trunk"
)

// TestMemberKindFromConfigAndPod: eni_conf enable_eni_trunking turns the member kind on; a pod
// asks for it with Terway's k8s.aliyun.com/pod-eni (or pod-networking) annotation, an
// exclusive-ENI annotation wins, and a non-boolean pod-eni is a bad request, not a silent no.
func TestMemberKindFromConfigAndPod(t *testing.T) {
	if ks := EnabledKinds(NodeInfo{Config: eniconfig.Config{EnableENITrunking: true}}); len(ks) != 1 || ks[0].Kind != KindMember {
		t.Fatalf("trunking node: kinds %v, want member", ks)
	}
	if ks := EnabledKinds(NodeInfo{}); len(ks) != 0 {
		t.Fatalf("node without trunking offers %v", ks)
	}
	k := PodKey{Namespace: "ns", Name: "p", ContainerID: "c"}
	for _, c := range []struct {
		ann  map[string]string
		want Kind
	}{
		{map[string]string{trunk.AnnotationPodENI: "true"}, KindMember},
		{map[string]string{trunk.AnnotationPodENI: "false"}, KindENIIP},
		{map[string]string{trunk.AnnotationPodNetworking: "trunk-pods"}, KindMember},
		{map[string]string{trunk.AnnotationPodENI: "true", AnnotationENI: "true"}, KindENI},
	} {
		r, err := RequestFromPod(k, c.ann, false)
		if err != nil || r.Kind != c.want {
			t.Errorf("annotations %v: kind %q err %v, want %q", c.ann, r.Kind, err, c.want)
		}
	}
	if _, err := RequestFromPod(k, map[string]string{trunk.AnnotationPodENI: "yes please"}, false); !errors.Is(err, ErrBadPodRequest) {
		t.Fatalf("a non-boolean pod-eni: %v, want ErrBadPodRequest", err)
	}
}
