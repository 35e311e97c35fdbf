package api

import (
	"fmt"
	"regexp"
	"strings"
)

// Kubernetes' own rules for the names a pod reference carries; the store key is
// namespace/name/containerID, so anything else could make two pods share a key, and the
// names end up in logs and Events.
var (
	dnsLabel     = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	dnsSubdomain = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)
	// containerIDPattern is the CNI spec's (libcni's ValidateContainerID).
	containerIDPattern = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`)
)

const maxContainerID = 256

// quoteBounded quotes s for an error message, cut to a length an operator can read.
func quoteBounded(s string) string {
	const max = 80
	if len(s) > max {
		return fmt.Sprintf("%q… (%d bytes)", s[:max], len(s))
	}
	return fmt.Sprintf("%q", s)
}

// ValidatePodRef checks a pod reference's names as Kubernetes and the CNI spec define them:
// namespace a DNS-1123 label (≤63), name a DNS-1123 subdomain (≤253), container ID the CNI's
// pattern (≤256). It reports every problem at once.
func ValidatePodRef(r PodRef) error {
	var probs []string
	switch {
	case r.Namespace == "":
		probs = append(probs, "namespace is empty (K8S_POD_NAMESPACE)")
	case len(r.Namespace) > 63 || !dnsLabel.MatchString(r.Namespace):
		probs = append(probs, fmt.Sprintf("namespace %s is not a DNS-1123 label of at most 63 characters", quoteBounded(r.Namespace)))
	}
	switch {
	case r.Name == "":
		probs = append(probs, "name is empty (K8S_POD_NAME)")
	case len(r.Name) > 253 || !dnsSubdomain.MatchString(r.Name):
		probs = append(probs, fmt.Sprintf("name %s is not a DNS-1123 subdomain of at most 253 characters", quoteBounded(r.Name)))
	}
	if err := ValidateContainerID(r.ContainerID); err != nil {
		probs = append(probs, err.Error())
	}
	if len(probs) == 0 {
		return nil
	}
	return fmt.Errorf("invalid pod reference: %s", strings.Join(probs, "; "))
}

// ValidateContainerID checks a container ID against the CNI spec's pattern and a length cap.
func ValidateContainerID(id string) error {
	switch {
	case id == "":
		return fmt.Errorf("container ID is empty (CNI_CONTAINERID)")
	case len(id) > maxContainerID || !containerIDPattern.MatchString(id):
		return fmt.Errorf("container ID %s must match %s and be at most %d characters", quoteBounded(id), containerIDPattern, maxContainerID)
	}
	return nil
}
