// Package eniconfig reads and validates the Terway-compatible `eni_conf` document (the key of the
// `eni-config` ConfigMap) that tells the ENI pool which vSwitches, security groups, tags and pool
// sizes to use, and watches the mounted file for changes.
//
// Field names and defaults follow Terway so that an existing `eni-config` ConfigMap works
// unchanged. Fields Terway has and tern does not use are accepted with a warning; `hot_plug` is a
// tern extension that Terway does not have.
package eniconfig

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"time"
)

// Selection policies for vSwitches (vswitch_selection_policy).
const (
	// VSwitchRandom spreads ENIs over the zone's vSwitches at random (Terway's default).
	VSwitchRandom = "random"
	// VSwitchOrdered prefers the vSwitch with the most free addresses.
	VSwitchOrdered = "ordered"
)

// Selection policies for ENIs (eni_selection_policy).
const (
	// ENIMostIPs packs pods onto the ENI that already has the most addresses (Terway's default).
	ENIMostIPs = "most_ips"
	// ENILeastIPs spreads pods over the ENI with the fewest addresses.
	ENILeastIPs = "least_ips"
)

// Limits and defaults from Terway's configuration.
const (
	DefaultMaxPoolSize = 5
	DefaultMinPoolSize = 0
	// MaxSecurityGroups is the most security groups one ENI can carry.
	MaxSecurityGroups = 10
)

// Config is a validated eni_conf. Durations are already parsed; defaults are already applied.
type Config struct {
	AccessKey      string
	AccessSecret   string
	CredentialPath string
	RegionID       string
	ServiceCIDR    netip.Prefix // zero when not set
	// VSwitches maps a zone ID to the vSwitch IDs pods in that zone may use, in config order.
	VSwitches map[string][]string
	// SecurityGroups merges security_group and security_groups, de-duplicated, in order.
	SecurityGroups     []string
	ENITags            map[string]string
	MaxPoolSize        int
	MinPoolSize        int
	IPWarmUpSize       int
	IdleIPReclaimAfter time.Duration // 0: idle addresses above min are kept until above max
	VSwitchSelection   string        // VSwitchRandom or VSwitchOrdered
	ENISelection       string        // ENIMostIPs or ENILeastIPs
	IPStack            string        // only "ipv4" is supported
	EnableENITrunking  bool
	IPAMType           string // "" or "default"
	// HotPlug (tern only) allows creating, attaching, detaching and deleting ENIs at run time.
	// When false the pool only uses ENIs already attached and tagged as ours.
	HotPlug bool
}

// VSwitchesInZone returns the configured vSwitches for zone, or nil.
func (c Config) VSwitchesInZone(zone string) []string {
	return append([]string(nil), c.VSwitches[zone]...)
}

// raw mirrors the JSON document. Pointers tell "absent" from "zero".
type raw struct {
	AccessKey              string              `json:"access_key"`
	AccessSecret           string              `json:"access_secret"`
	CredentialPath         string              `json:"credential_path"`
	RegionID               string              `json:"region_id"`
	ServiceCIDR            string              `json:"service_cidr"`
	VSwitches              map[string][]string `json:"vswitches"`
	SecurityGroup          string              `json:"security_group"`
	SecurityGroups         []string            `json:"security_groups"`
	ENITags                map[string]string   `json:"eni_tags"`
	MaxPoolSize            *int                `json:"max_pool_size"`
	MinPoolSize            *int                `json:"min_pool_size"`
	IPWarmUpSize           *int                `json:"ip_warm_up_size"`
	IdleIPReclaimAfter     json.RawMessage     `json:"idle_ip_reclaim_after"`
	VSwitchSelectionPolicy string              `json:"vswitch_selection_policy"`
	ENISelectionPolicy     string              `json:"eni_selection_policy"`
	IPStack                string              `json:"ip_stack"`
	EnableENITrunking      bool                `json:"enable_eni_trunking"`
	IPAMType               string              `json:"ipam_type"`
	HotPlug                *bool               `json:"hot_plug"`
}

// knownFields lists the JSON keys raw understands; anything else produces a warning.
var knownFields = []string{
	"access_key", "access_secret", "credential_path", "region_id", "service_cidr", "vswitches",
	"security_group", "security_groups", "eni_tags", "max_pool_size", "min_pool_size",
	"ip_warm_up_size", "idle_ip_reclaim_after", "vswitch_selection_policy", "eni_selection_policy",
	"ip_stack", "enable_eni_trunking", "ipam_type", "hot_plug",
}

// ValidationError names the field at fault, the value found and what is allowed.
type ValidationError struct {
	Field   string
	Value   string
	Allowed string
}

func (e *ValidationError) Error() string {
	return fmt.Sprintf("eni_conf: field %q has value %s; allowed: %s", e.Field, e.Value, e.Allowed)
}

// Parse decodes and validates an eni_conf document. Warnings list unknown fields and accepted
// fields tern ignores; they are not errors because Terway configs carry them. All validation
// problems are returned together (errors.Join of *ValidationError).
func Parse(data []byte) (Config, []string, error) {
	var r raw
	if err := json.Unmarshal(data, &r); err != nil {
		return Config{}, nil, fmt.Errorf("eni_conf is not valid JSON (%w); check the eni-config ConfigMap's eni_conf key", err)
	}
	var all map[string]json.RawMessage
	if err := json.Unmarshal(data, &all); err != nil {
		return Config{}, nil, fmt.Errorf("eni_conf must be a JSON object: %w", err)
	}
	var warnings []string
	known := make(map[string]bool, len(knownFields))
	for _, f := range knownFields {
		known[f] = true
	}
	var unknown []string
	for k := range all {
		if !known[k] {
			unknown = append(unknown, k)
		}
	}
	sort.Strings(unknown)
	for _, k := range unknown {
		warnings = append(warnings, fmt.Sprintf("eni_conf field %q is not used by tern; ignored", k))
	}

	c := Config{
		AccessKey:         r.AccessKey,
		AccessSecret:      r.AccessSecret,
		CredentialPath:    r.CredentialPath,
		RegionID:          r.RegionID,
		ENITags:           r.ENITags,
		MaxPoolSize:       DefaultMaxPoolSize,
		MinPoolSize:       DefaultMinPoolSize,
		VSwitchSelection:  VSwitchRandom,
		ENISelection:      ENIMostIPs,
		IPStack:           "ipv4",
		EnableENITrunking: r.EnableENITrunking,
		IPAMType:          r.IPAMType,
		HotPlug:           true,
	}
	var errs []error
	bad := func(field, value, allowed string) {
		errs = append(errs, &ValidationError{Field: field, Value: value, Allowed: allowed})
	}

	if (r.AccessKey == "") != (r.AccessSecret == "") {
		bad("access_key/access_secret", "only one of them set", "both set, or both empty (then credential_path or the environment is used)")
	}
	if r.ServiceCIDR != "" {
		p, err := netip.ParsePrefix(strings.TrimSpace(r.ServiceCIDR))
		if err != nil {
			bad("service_cidr", quote(r.ServiceCIDR), "a CIDR such as \"172.21.0.0/20\"")
		} else {
			c.ServiceCIDR = p.Masked()
		}
	}

	if len(r.VSwitches) == 0 {
		bad("vswitches", "empty", "a map of zone ID to a non-empty list of vSwitch IDs, e.g. {\"cn-hangzhou-i\":[\"vsw-xxx\"]}")
	}
	c.VSwitches = make(map[string][]string, len(r.VSwitches))
	zones := make([]string, 0, len(r.VSwitches))
	for z := range r.VSwitches {
		zones = append(zones, z)
	}
	sort.Strings(zones)
	for _, zone := range zones {
		ids := r.VSwitches[zone]
		if zone == "" {
			bad("vswitches", "a zone with an empty name", "zone IDs such as \"cn-hangzhou-i\"")
			continue
		}
		if len(ids) == 0 {
			bad("vswitches."+zone, "[]", "at least one vSwitch ID")
			continue
		}
		seen := map[string]bool{}
		for _, id := range ids {
			if !strings.HasPrefix(id, "vsw-") {
				bad("vswitches."+zone, quote(id), "vSwitch IDs starting with \"vsw-\"")
				continue
			}
			if !seen[id] {
				seen[id] = true
				c.VSwitches[zone] = append(c.VSwitches[zone], id)
			}
		}
	}

	seenSG := map[string]bool{}
	for _, sg := range append([]string{r.SecurityGroup}, r.SecurityGroups...) {
		if sg == "" || seenSG[sg] {
			continue
		}
		if !strings.HasPrefix(sg, "sg-") {
			bad("security_groups", quote(sg), "security group IDs starting with \"sg-\"")
			continue
		}
		seenSG[sg] = true
		c.SecurityGroups = append(c.SecurityGroups, sg)
	}
	if len(c.SecurityGroups) == 0 {
		bad("security_group/security_groups", "empty", "at least one security group ID")
	}
	if len(c.SecurityGroups) > MaxSecurityGroups {
		bad("security_groups", fmt.Sprintf("%d groups", len(c.SecurityGroups)), fmt.Sprintf("at most %d (an ENI carries at most %d)", MaxSecurityGroups, MaxSecurityGroups))
	}

	// In key order: the same document must give the same report on every reload (the watcher
	// logs it, and an operator compares reports), and map order is random.
	tagKeys := make([]string, 0, len(r.ENITags))
	for k := range r.ENITags {
		tagKeys = append(tagKeys, k)
	}
	sort.Strings(tagKeys)
	for _, k := range tagKeys {
		if k == "" {
			bad("eni_tags", "an empty key", "non-empty tag keys")
		}
		if strings.HasPrefix(k, "aliyun") || strings.HasPrefix(k, "acs:") {
			bad("eni_tags", quote(k), "keys not starting with \"aliyun\" or \"acs:\" (reserved by the cloud)")
		}
	}

	if r.MaxPoolSize != nil {
		c.MaxPoolSize = *r.MaxPoolSize
	}
	if r.MinPoolSize != nil {
		c.MinPoolSize = *r.MinPoolSize
	}
	if c.MaxPoolSize < 0 {
		bad("max_pool_size", fmt.Sprint(c.MaxPoolSize), "an integer ≥ 0")
	}
	if c.MinPoolSize < 0 {
		bad("min_pool_size", fmt.Sprint(c.MinPoolSize), "an integer ≥ 0")
	}
	if c.MinPoolSize > c.MaxPoolSize && c.MaxPoolSize >= 0 {
		bad("min_pool_size", fmt.Sprint(c.MinPoolSize), fmt.Sprintf("at most max_pool_size (%d)", c.MaxPoolSize))
	}
	if r.IPWarmUpSize != nil {
		if *r.IPWarmUpSize < 0 {
			bad("ip_warm_up_size", fmt.Sprint(*r.IPWarmUpSize), "an integer ≥ 0")
		}
		c.IPWarmUpSize = *r.IPWarmUpSize
	}

	if len(bytes.TrimSpace(r.IdleIPReclaimAfter)) > 0 && string(bytes.TrimSpace(r.IdleIPReclaimAfter)) != "null" {
		d, err := parseDuration(r.IdleIPReclaimAfter)
		if err != nil || d < 0 {
			bad("idle_ip_reclaim_after", string(r.IdleIPReclaimAfter), "a non-negative Go duration string such as \"30m\", or a number of seconds")
		} else {
			c.IdleIPReclaimAfter = d
		}
	}

	switch r.VSwitchSelectionPolicy {
	case "":
	case VSwitchRandom, VSwitchOrdered:
		c.VSwitchSelection = r.VSwitchSelectionPolicy
	default:
		bad("vswitch_selection_policy", quote(r.VSwitchSelectionPolicy), `"random" or "ordered"`)
	}
	switch r.ENISelectionPolicy {
	case "":
	case ENIMostIPs, ENILeastIPs:
		c.ENISelection = r.ENISelectionPolicy
	default:
		bad("eni_selection_policy", quote(r.ENISelectionPolicy), `"most_ips" or "least_ips"`)
	}
	switch r.IPStack {
	case "", "ipv4":
	default:
		bad("ip_stack", quote(r.IPStack), `"ipv4" (tern does not support "ipv6" or "dual" yet)`)
	}
	switch r.IPAMType {
	case "", "default":
	default:
		bad("ipam_type", quote(r.IPAMType), `"" or "default" (tern allocates on the node; "crd" centralised IPAM is not supported)`)
	}
	if r.HotPlug != nil {
		c.HotPlug = *r.HotPlug
	}

	if err := errors.Join(errs...); err != nil {
		return Config{}, warnings, err
	}
	return c, warnings, nil
}

// parseDuration accepts a Go duration string ("30m") or a JSON number of seconds.
func parseDuration(b json.RawMessage) (time.Duration, error) {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		return time.ParseDuration(s)
	}
	var n float64
	if err := json.Unmarshal(b, &n); err != nil {
		return 0, err
	}
	return time.Duration(n * float64(time.Second)), nil
}

func quote(s string) string { return fmt.Sprintf("%q", s) }
