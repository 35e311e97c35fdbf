package simulate

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/tern-net/tern/policy"
)

// Probe is one connection to decide: each end "NS/POD" or an IPv4 address.
type Probe struct {
	From     string `json:"from"`
	To       string `json:"to"`
	Port     int    `json:"port"`
	Protocol string `json:"protocol"`
}

// Result is a probe's verdict. Egress is the verdict of the policies selecting the source
// (true when it is not a pod or none selects it for egress), Ingress of those selecting
// the destination.
type Result struct {
	From     string `json:"from"`
	To       string `json:"to"`
	Port     int    `json:"port"`
	Protocol string `json:"protocol"`
	Allowed  bool   `json:"allowed"`
	Egress   bool   `json:"egress"`
	Ingress  bool   `json:"ingress"`
}

type typeMeta struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Items      []json.RawMessage `json:"items"`
}

// ParseState reads Kubernetes objects — a YAML stream of documents, a JSON list, or a
// `kind: List` — into a policy.State: v1 Namespace, v1 Pod and networking.k8s.io/v1
// NetworkPolicy. Every problem is reported, each naming the document and the field.
func ParseState(r io.Reader) (policy.State, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return policy.State{}, fmt.Errorf("read state: %w", err)
	}
	var raws []json.RawMessage
	if t := bytes.TrimSpace(data); len(t) > 0 && t[0] == '[' {
		if err := json.Unmarshal(t, &raws); err != nil {
			return policy.State{}, fmt.Errorf("state is a JSON list but does not parse: %w", err)
		}
	} else {
		dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
		for {
			var raw json.RawMessage
			if err := dec.Decode(&raw); err != nil {
				if errors.Is(err, io.EOF) {
					break
				}
				return policy.State{}, fmt.Errorf("state document %d does not parse: %w", len(raws)+1, err)
			}
			if len(bytes.TrimSpace(raw)) == 0 || string(bytes.TrimSpace(raw)) == "null" {
				continue
			}
			raws = append(raws, raw)
		}
	}
	var (
		st   policy.State
		errs []error
	)
	var add func(where string, raw json.RawMessage)
	add = func(where string, raw json.RawMessage) {
		var tm typeMeta
		if err := json.Unmarshal(raw, &tm); err != nil {
			errs = append(errs, fmt.Errorf("%s: not an object: %w", where, err))
			return
		}
		switch {
		case tm.Kind == "List":
			for i, it := range tm.Items {
				add(fmt.Sprintf("%s items[%d]", where, i), it)
			}
		case tm.APIVersion == "v1" && tm.Kind == "Namespace":
			var ns corev1.Namespace
			if err := strictUnmarshal(raw, &ns); err != nil {
				errs = append(errs, fmt.Errorf("%s (Namespace): %w", where, err))
				return
			}
			if ns.Name == "" {
				errs = append(errs, fmt.Errorf("%s (Namespace): metadata.name is empty", where))
				return
			}
			st.Namespaces = append(st.Namespaces, ns)
		case tm.APIVersion == "v1" && tm.Kind == "Pod":
			var p corev1.Pod
			if err := strictUnmarshal(raw, &p); err != nil {
				errs = append(errs, fmt.Errorf("%s (Pod): %w", where, err))
				return
			}
			if p.Namespace == "" {
				p.Namespace = "default"
			}
			name := fmt.Sprintf("%s (Pod %s/%s)", where, p.Namespace, p.Name)
			if p.Name == "" {
				errs = append(errs, fmt.Errorf("%s: metadata.name is empty", name))
				return
			}
			if a, err := netip.ParseAddr(p.Status.PodIP); err != nil || !a.Is4() {
				errs = append(errs, fmt.Errorf("%s: status.podIP %q is not an IPv4 address (the simulator needs each pod's address)", name, p.Status.PodIP))
				return
			}
			st.Pods = append(st.Pods, p)
		case tm.APIVersion == "networking.k8s.io/v1" && tm.Kind == "NetworkPolicy":
			var np networkingv1.NetworkPolicy
			if err := strictUnmarshal(raw, &np); err != nil {
				errs = append(errs, fmt.Errorf("%s (NetworkPolicy): %w", where, err))
				return
			}
			if np.Namespace == "" {
				np.Namespace = "default"
			}
			st.Policies = append(st.Policies, np)
		default:
			errs = append(errs, fmt.Errorf("%s: apiVersion %q kind %q is not one the simulator reads (v1 Namespace, v1 Pod, networking.k8s.io/v1 NetworkPolicy)",
				where, tm.APIVersion, tm.Kind))
		}
	}
	for i, raw := range raws {
		add(fmt.Sprintf("state document %d", i+1), raw)
	}
	seen := map[string]bool{}
	for _, p := range st.Pods {
		k := p.Namespace + "/" + p.Name
		if seen[k] {
			errs = append(errs, fmt.Errorf("pod %s appears twice in the state", k))
		}
		seen[k] = true
	}
	return st, errors.Join(errs...)
}

// strictUnmarshal refuses unknown fields, so a misspelt field is an error naming it
// rather than a silently different policy.
func strictUnmarshal(raw json.RawMessage, v any) error {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w", err)
	}
	return nil
}

// ParseProbes reads a JSON array of probes and checks each.
func ParseProbes(r io.Reader) ([]Probe, error) {
	var probes []Probe
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&probes); err != nil {
		return nil, fmt.Errorf("probes must be a JSON array of {\"from\", \"to\", \"port\", \"protocol\"}: %w", err)
	}
	var errs []error
	for i := range probes {
		p := &probes[i]
		if p.Protocol == "" {
			p.Protocol = "TCP"
		}
		p.Protocol = strings.ToUpper(p.Protocol)
		if p.Protocol == "ICMP" {
			// An echo request: no port (docs/networkpolicy.md, ICMP).
			if p.Port != 0 {
				errs = append(errs, fmt.Errorf("probe %d: ICMP has no port: leave port out or 0 (got %d)", i, p.Port))
			}
		} else {
			if policy.ProtoNumber(corev1.Protocol(p.Protocol)) == 0 {
				errs = append(errs, fmt.Errorf("probe %d: protocol %q is not TCP, UDP, SCTP or ICMP", i, p.Protocol))
			}
			if p.Port < 1 || p.Port > 65535 {
				errs = append(errs, fmt.Errorf("probe %d: port %d is not 1-65535", i, p.Port))
			}
		}
		if p.From == "" || p.To == "" {
			errs = append(errs, fmt.Errorf("probe %d: from and to are both required (\"NS/POD\" or an IPv4 address)", i))
		}
	}
	return probes, errors.Join(errs...)
}
