package policy

import (
	"hash/fnv"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Identity is the number the datapath knows a peer by: one per distinct pod "shape"
// (namespace, namespace labels, pod labels, named-port table), one per ipBlock prefix, and
// a few reserved values.
//
// Why the named-port table is part of a pod's identity: an egress rule to port "http" must
// resolve the name on each destination pod. Two pods with the same labels but different
// container ports then get different identities, so every rule stays exact per peer. Pods
// of one Deployment share their template, so this rarely splits an identity.
//
// Why a hash: the number is fnv-1a of the canonical description, so every node that sees
// the same cluster computes the same identities with no coordination. Identities never
// leave a node (nothing carries them on the wire; each node's maps are compiled from its
// own view), so agreement is for operators comparing nodes, not for correctness. Two
// descriptions that hash alike are separated by probing upwards in the sorted order of the
// descriptions, which every node with the same view repeats identically.
type Identity uint32

const (
	// IdentityAny in a rule key means "any peer": a rule with no from/to peers. As the
	// identity of an address it means "unknown" (no pod, no ipBlock prefix).
	IdentityAny Identity = 0
	// IdentityHost is the local node: always allowed both ways (Kubernetes' rule that
	// traffic to and from a pod's own node is always allowed, so kubelet probes work).
	IdentityHost Identity = 1

	minPodIdentity Identity = 256
	// cidrIdentityBit marks identities of ipBlock prefixes; pod identities are below it.
	cidrIdentityBit Identity = 1 << 31
)

// IsCIDR tells whether id names an ipBlock prefix.
func (id Identity) IsCIDR() bool { return id&cidrIdentityBit != 0 }

// metadataNameLabel is the label the apiserver puts on every namespace (since 1.21); the
// compiler adds it when a state file omits it, so namespaceSelector on it works offline.
const metadataNameLabel = "kubernetes.io/metadata.name"

// podShape is everything a selector or a named port can look at in a pod.
type podShape struct {
	Namespace  string
	NSLabels   map[string]string
	Labels     map[string]string
	NamedPorts map[string]NamedPort // name -> protocol and number
}

// NamedPort is a container port with a name.
type NamedPort struct {
	Protocol corev1.Protocol
	Port     uint16
}

func sortedKV(m map[string]string) string {
	keys := slices.Sorted(maps.Keys(m))
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(strconv.Quote(k))
		b.WriteByte('=')
		b.WriteString(strconv.Quote(m[k]))
		b.WriteByte(',')
	}
	return b.String()
}

// canonical is the description an identity is the hash of.
func (s *podShape) canonical() string {
	var b strings.Builder
	b.WriteString("ns=" + strconv.Quote(s.Namespace))
	b.WriteString(";nsl=" + sortedKV(s.NSLabels))
	b.WriteString(";l=" + sortedKV(s.Labels))
	b.WriteString(";p=")
	for _, n := range slices.Sorted(maps.Keys(s.NamedPorts)) {
		p := s.NamedPorts[n]
		b.WriteString(strconv.Quote(n) + "=" + string(p.Protocol) + "/" + strconv.Itoa(int(p.Port)) + ",")
	}
	return b.String()
}

func hash32(s string) uint32 {
	h := fnv.New32a()
	h.Write([]byte(s))
	return h.Sum32()
}

// allocate numbers every description in descs: fnv-1a folded into [lo, hi), probing
// upwards past taken numbers, in sorted order of the descriptions.
func allocate(descs []string, lo, hi Identity) map[string]Identity {
	sort.Strings(descs)
	out := make(map[string]Identity, len(descs))
	taken := make(map[Identity]bool, len(descs))
	span := uint32(hi - lo)
	for _, d := range descs {
		if _, dup := out[d]; dup {
			continue
		}
		off := hash32(d) % span
		for taken[lo+Identity(off)] {
			off = (off + 1) % span
		}
		id := lo + Identity(off)
		taken[id] = true
		out[d] = id
	}
	return out
}
