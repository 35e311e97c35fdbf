package ipam

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/tern-net/tern/ipam/trunk"
)

// ErrBadPodRequest: the pod's annotations that choose its resource are malformed.
var ErrBadPodRequest = errors.New("invalid pod network request")

// Pod annotations that choose the kind of resource and its placement, as Terway spells them.
const (
	// AnnotationENI "true" asks for an exclusive ENI. Terway's code has spelled it both
	// k8s.aliyun.com/eni and k8s.aliyun.com/ENI; both are read.
	AnnotationENI       = "k8s.aliyun.com/eni"
	annotationENILegacy = "k8s.aliyun.com/ENI"
	// AnnotationPodNetworks is Terway's per-pod network placement:
	// {"podNetworks":[{"interface":"eth0","vSwitchOptions":["vsw-…"],"securityGroupIDs":["sg-…"]}]}.
	// tern reads the eth0 entry (or the only one) for exclusive ENIs.
	AnnotationPodNetworks = "k8s.aliyun.com/pod-networks"
)

// podNetworks mirrors the fields of Terway's annotation that tern reads.
type podNetworks struct {
	PodNetworks []struct {
		Interface        string   `json:"interface"`
		VSwitchOptions   []string `json:"vSwitchOptions"`
		SecurityGroupIDs []string `json:"securityGroupIDs"`
	} `json:"podNetworks"`
}

// RequestFromPod builds a pod's request from its annotations and whether a container requests
// the aliyun/eni extended resource. A malformed annotation is an error naming it: the pod's
// placement is the user's choice, and guessing would put the pod on the wrong network.
func RequestFromPod(key PodKey, annotations map[string]string, requestsENIResource bool) (Request, error) {
	req := Request{Key: key, Kind: KindENIIP}
	if requestsENIResource || truthy(annotations[AnnotationENI]) || truthy(annotations[annotationENILegacy]) {
		req.Kind = KindENI
	} else if member, err := trunk.WantsMember(annotations); err != nil {
		return req, fmt.Errorf("%w: pod %s/%s: %v", ErrBadPodRequest, key.Namespace, key.Name, err)
	} else if member {
		// Terway's PodNetworking webhook marks a trunk pod with k8s.aliyun.com/pod-eni: "true"
		// (and pod-networking); without the CRD a pod sets the annotation itself.
		req.Kind = KindMember
	}
	raw, ok := annotations[AnnotationPodNetworks]
	if !ok || strings.TrimSpace(raw) == "" {
		return req, nil
	}
	var pn podNetworks
	if err := json.Unmarshal([]byte(raw), &pn); err != nil {
		return req, fmt.Errorf("%w: pod %s/%s: annotation %s is not valid JSON (%v); want {\"podNetworks\":[{\"interface\":\"eth0\",\"vSwitchOptions\":[…],\"securityGroupIDs\":[…]}]}",
			ErrBadPodRequest, key.Namespace, key.Name, AnnotationPodNetworks, err)
	}
	for _, n := range pn.PodNetworks {
		if n.Interface == "" || n.Interface == "eth0" || len(pn.PodNetworks) == 1 {
			req.VSwitchIDs, req.SecurityGroups = n.VSwitchOptions, n.SecurityGroupIDs
			break
		}
	}
	if len(req.SecurityGroups) > 10 {
		return req, fmt.Errorf("%w: pod %s/%s: annotation %s lists %d security groups; an ENI takes at most 10",
			ErrBadPodRequest, key.Namespace, key.Name, AnnotationPodNetworks, len(req.SecurityGroups))
	}
	return req, nil
}

// truthy reads an annotation value the way Terway does: anything but empty, "false" and "0".
func truthy(v string) bool {
	v = strings.TrimSpace(strings.ToLower(v))
	return v != "" && v != "false" && v != "0"
}
