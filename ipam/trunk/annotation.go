package trunk

import (
	"fmt"
	"strconv"
)

// Pod annotations that ask for a member ENI, with Terway's names: Terway's webhook marks a pod
// that gets its own ENI from a PodNetworking with k8s.aliyun.com/pod-eni: "true" and names the
// PodNetworking in k8s.aliyun.com/pod-networking; on a node with trunking that ENI is a member
// of the node's trunk. tern has no PodNetworking CRD and webhook yet: a pod opts in by setting
// either annotation itself.
const (
	AnnotationPodENI        = "k8s.aliyun.com/pod-eni"
	AnnotationPodNetworking = "k8s.aliyun.com/pod-networking"
)

// WantsMember tells whether a pod's annotations ask for a member ENI. A pod-eni value that is
// not a boolean is an error (the operator meant something), not a silent no.
func WantsMember(annotations map[string]string) (bool, error) {
	if v, ok := annotations[AnnotationPodENI]; ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return false, fmt.Errorf("pod annotation %s=%q is not a boolean: use \"true\" or \"false\"", AnnotationPodENI, v)
		}
		if b {
			return true, nil
		}
	}
	return annotations[AnnotationPodNetworking] != "", nil
}
