package agent

import (
	"encoding/json"
	"fmt"
	"strconv"
)

// NetworkPolicyConfig is the agent's NetworkPolicy settings (needs kubeconfig).
type NetworkPolicyConfig struct {
	// Enforce turns enforcement on (the default) or off. Off: no policy stage runs on any
	// pod, and the policy component only keeps the ipcache identities.
	Enforce *bool `json:"enforce,omitempty"`
	// Audit puts every pod of the node in audit mode: what policy would drop is counted
	// (reason policy_audit) and passed.
	Audit bool `json:"audit,omitempty"`
	// AuditNamespaces puts only these namespaces' pods in audit mode.
	AuditNamespaces []string `json:"auditNamespaces,omitempty"`
	// AllowedEvents sends allowed verdicts (the first packet of each new flow of an
	// isolated pod) to `ternctl monitor` too; denials always are. Off by default: on a busy
	// node it is one event per connection, and events share one rate limit with drops.
	// Applied when the datapath is loaded (an agent restart).
	AllowedEvents bool `json:"allowedEvents,omitempty"`
}

// TerwayBool reads Terway's ConfigMap-style booleans: "true"/"false" strings or JSON
// booleans.
type TerwayBool bool

// UnmarshalJSON accepts true, false, "true", "false" (and the other spellings
// strconv.ParseBool knows).
func (b *TerwayBool) UnmarshalJSON(data []byte) error {
	var v bool
	if err := json.Unmarshal(data, &v); err == nil {
		*b = TerwayBool(v)
		return nil
	}
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		return fmt.Errorf("%s is not a boolean: want true, false, \"true\" or \"false\"", data)
	}
	v, err := strconv.ParseBool(s)
	if err != nil {
		return fmt.Errorf("%q is not a boolean: want \"true\" or \"false\"", s)
	}
	*b = TerwayBool(v)
	return nil
}

// PolicyEnforced tells whether NetworkPolicy is enforced: networkPolicy.enforce, else
// Terway's disable_network_policy, else on.
func (c Config) PolicyEnforced() bool {
	if c.NetworkPolicy.Enforce != nil {
		return *c.NetworkPolicy.Enforce
	}
	if c.DisableNetworkPolicy != nil {
		return !bool(*c.DisableNetworkPolicy)
	}
	return true
}

func (c Config) validatePolicy() []error {
	if c.NetworkPolicy.Enforce != nil && c.DisableNetworkPolicy != nil && *c.NetworkPolicy.Enforce == bool(*c.DisableNetworkPolicy) {
		return []error{fmt.Errorf("networkPolicy.enforce %v and disable_network_policy %v contradict each other: set one of them",
			*c.NetworkPolicy.Enforce, bool(*c.DisableNetworkPolicy))}
	}
	return nil
}
