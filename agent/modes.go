package agent

import (
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// IPAM modes (Config.IPAM.Mode).
const (
	// IPAMENIIP is tern's own IPAM: pod addresses are secondary IPs of the node's ENIs, and
	// tern-cni builds the pod's veth (the default).
	IPAMENIIP = "eniip"
	// IPAMNone turns tern's IPAM off: another plugin earlier in the conflist creates the pod's
	// interface and address, tern-cni runs chained after it (docs/cni.md, "Chaining"), and
	// the agent serves Services, hostPorts and policy only. It needs no cloud credentials,
	// reads no eni_conf and never touches an ENI.
	IPAMNone = "none"
)

// IPAMConfig chooses where pod addresses come from.
type IPAMConfig struct {
	// Mode is "eniip" (default) or "none".
	Mode string `json:"mode,omitempty"`
}

// Off says whether tern's IPAM is off (chaining mode).
func (c IPAMConfig) Off() bool { return c.Mode == IPAMNone }

// KubeProxyReplacement is Cilium's (and Terway's, which passes it to the Cilium it chains)
// kube-proxy-replacement setting. Cilium ≥ 1.14 takes "true" or "false"; older releases took
// "strict", "partial" and "disabled". tern reads them as follows:
//
//	true, strict     tern is the node's kube-proxy: every Service type it implements,
//	                 hostPort, and socket LB when socketLB.enabled.
//	false, disabled  kube-proxy runs beside tern: tern still load-balances ClusterIPs for
//	                 pods in tc (as Cilium does without replacement), but turns nothing on
//	                 that would take traffic from kube-proxy: socket LB and hostPort are
//	                 refused.
//	partial          as false, except that socket LB and hostPort may be turned on one by
//	                 one (Cilium's "partial": only the features enabled individually).
//
// Unset means true: replacing kube-proxy is what tern is for, and configurations written
// before this setting existed keep working as they did.
type KubeProxyReplacement string

// Values of KubeProxyReplacement after normalisation.
const (
	KPRTrue     KubeProxyReplacement = "true"
	KPRFalse    KubeProxyReplacement = "false"
	KPRStrict   KubeProxyReplacement = "strict"
	KPRPartial  KubeProxyReplacement = "partial"
	KPRDisabled KubeProxyReplacement = "disabled"
)

// UnmarshalJSON accepts a JSON boolean or one of the strings above (any case), as Cilium's
// ConfigMap writes them.
func (k *KubeProxyReplacement) UnmarshalJSON(b []byte) error {
	var v bool
	if err := json.Unmarshal(b, &v); err == nil {
		*k = KubeProxyReplacement(strconv.FormatBool(v))
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("kube-proxy-replacement %s: want true, false, \"strict\", \"partial\" or \"disabled\"", b)
	}
	*k = KubeProxyReplacement(strings.ToLower(strings.TrimSpace(s)))
	return nil
}

func (k KubeProxyReplacement) validate() error {
	switch k {
	case "", KPRTrue, KPRFalse, KPRStrict, KPRPartial, KPRDisabled:
		return nil
	}
	return fmt.Errorf("kube-proxy-replacement %q is not one of true, false (Cilium ≥ 1.14) or strict, partial, disabled (older Cilium): leave it out for true", string(k))
}

// Replaces says whether tern stands in for kube-proxy on this node.
func (k KubeProxyReplacement) Replaces() bool {
	return k == "" || k == KPRTrue || k == KPRStrict
}

// allowsFeatures says whether socket LB and hostPort may be on.
func (k KubeProxyReplacement) allowsFeatures() bool { return k.Replaces() || k == KPRPartial }

// HostPortEnabled says whether the agent serves the CNI portMappings capability: hostPort.enabled
// when set, else on exactly when tern replaces kube-proxy.
func (c Config) HostPortEnabled() bool {
	if c.HostPort.Enabled != nil {
		return *c.HostPort.Enabled
	}
	return c.KubeProxyReplacement.Replaces()
}

// HostPortConfig is the CNI portMappings capability (agent/hostport.go).
type HostPortConfig struct {
	// Enabled serves pods' hostPorts in the Service maps. Default: on when tern replaces
	// kube-proxy (kube-proxy-replacement true/strict), off otherwise.
	Enabled *bool `json:"enabled,omitempty"`
}

// validateModes refuses settings that contradict each other. Each error names both sides
// and says what to change.
func (c Config) validateModes() []error {
	var errs []error
	switch c.IPAM.Mode {
	case "", IPAMENIIP, IPAMNone:
	default:
		errs = append(errs, fmt.Errorf("ipam.mode %q is not %q or %q: leave it out for %s", c.IPAM.Mode, IPAMENIIP, IPAMNone, IPAMENIIP))
	}
	if err := c.KubeProxyReplacement.validate(); err != nil {
		errs = append(errs, err)
	} else if !c.KubeProxyReplacement.allowsFeatures() {
		if c.SocketLB.Enabled {
			errs = append(errs, fmt.Errorf("kube-proxy-replacement is %q but socketLB.enabled is true: socket LB takes Service traffic from kube-proxy; set kube-proxy-replacement to true (or partial), or turn socketLB off",
				string(c.KubeProxyReplacement)))
		}
		if c.HostPort.Enabled != nil && *c.HostPort.Enabled {
			errs = append(errs, fmt.Errorf("kube-proxy-replacement is %q but hostPort.enabled is true: with kube-proxy on the node, hostPorts belong to the portmap plugin; set kube-proxy-replacement to true (or partial), or hostPort.enabled false",
				string(c.KubeProxyReplacement)))
		}
	}
	if c.IPAM.Off() {
		// setDefaults fills no ENI field in this mode, so whatever is set came from the file.
		var set []string
		for name, isSet := range map[string]bool{
			"instanceID": c.InstanceID != "", "regionID": c.RegionID != "", "cloudEndpoint": c.CloudEndpoint != "",
			"cloud": c.Cloud != (CloudTuning{}), "eniConfigPath": c.ENIConfigPath != "",
			"eniConfigPollInterval": c.ENIConfigPollInterval != 0, "statePath": c.StatePath != "",
			"allocateWait": c.AllocateWait != 0, "maintainInterval": c.MaintainInterval != 0,
			"eniLinkTimeout": c.ENILinkTimeout != 0, "clusterID": c.ClusterID != "", "listingGrace": c.ListingGrace != 0,
		} {
			if isSet {
				set = append(set, name)
			}
		}
		if len(set) > 0 {
			sort.Strings(set)
			errs = append(errs, fmt.Errorf("ipam.mode is %q (chaining: another plugin assigns pod addresses) but ENI IPAM options are set: %s; remove them, or set ipam.mode %q",
				IPAMNone, strings.Join(set, ", "), IPAMENIIP))
		}
		if c.CNIConfDir != "" {
			errs = append(errs, fmt.Errorf("ipam.mode is %q but cniConfDir is %q: the conflist the agent installs has tern-cni alone, which gives pods no address; add tern-cni after your IPAM plugin in its conflist (docs/cni.md, \"Chaining\") and remove cniConfDir",
				IPAMNone, c.CNIConfDir))
		}
		if c.Masquerade.Enabled && len(c.Masquerade.VPCCIDRs) == 0 {
			errs = append(errs, fmt.Errorf("ipam.mode is %q and masquerade.enabled is true without masquerade.vpcCIDRs: without tern's IPAM the agent does not ask the cloud's metadata service for the VPC; list the cluster's own ranges (pod and node CIDRs) in masquerade.vpcCIDRs, or leave masquerade to the first plugin of the conflist",
				IPAMNone))
		}
	}
	return errs
}
