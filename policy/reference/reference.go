// Package reference decides NetworkPolicy connectivity straight from the
// networking.k8s.io/v1 API documentation, one query at a time, with no identities, no
// maps and no precomputation. It is deliberately naive: the compiler (package policy) and
// the datapath are tested against it.
//
// The rules it encodes, each from the API reference or the NetworkPolicy concept page:
//   - A pod is isolated for ingress (egress) when some policy in its namespace selects it
//     with its podSelector and has Ingress (Egress) in policyTypes. policyTypes defaults to
//     [Ingress], plus Egress when the policy has egress rules.
//   - An isolated pod allows a connection when at least one rule of at least one policy
//     selecting it (of that direction) allows it: policies and rules are a union.
//   - A rule allows a peer when it lists no peers, or when any listed peer matches (OR).
//     A peer with podSelector only: pods of the policy's namespace with matching labels;
//     namespaceSelector only: every pod in matching namespaces; both: pods with matching
//     labels in matching namespaces (AND); ipBlock: an address inside cidr and outside
//     every except (pod addresses included).
//   - A rule allows a port when it lists no ports, or when any listed port matches:
//     protocol (default TCP) equal, and port absent (all ports), equal to the number, inside
//     [port, endPort], or a name that the destination pod has as a container port of that
//     protocol. A named port towards an ipBlock peer thus matches only pod addresses inside
//     the block (an address that is not a pod has no container ports).
//   - ICMP (not a NetworkPolicy protocol, left to implementations): we follow Cilium, whose
//     ICMP passes only rules that list no ports. As the port rule above already says: a
//     rule with ports matches only their protocols, so ICMP needs a rule without ports.
//   - Namespaces carry kubernetes.io/metadata.name=<name> (the apiserver sets it).
//   - A pod cannot block access to itself; traffic to and from the pod's own node is
//     always allowed (not modelled here: queries are between pods and external addresses).
package reference

import (
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// Cluster is the objects the evaluator reads.
type Cluster struct {
	Namespaces []corev1.Namespace
	Pods       []corev1.Pod
	Policies   []networkingv1.NetworkPolicy
}

// Peer is one end of a connection: a pod, or (Pod nil) an address outside the pods.
type Peer struct {
	Pod  *corev1.Pod
	Addr netip.Addr
}

// Verdict of one connection.
type Verdict struct {
	Egress  bool // the source's policies allow it out
	Ingress bool // the destination's policies allow it in
}

// Allowed is Egress && Ingress.
func (v Verdict) Allowed() bool { return v.Egress && v.Ingress }

// Decide evaluates a connection from src to dst on protocol and port.
func (c *Cluster) Decide(src, dst Peer, proto corev1.Protocol, port int32) Verdict {
	v := Verdict{Egress: true, Ingress: true}
	if src.Pod != nil && dst.Pod != nil && src.Pod.Namespace == dst.Pod.Namespace && src.Pod.Name == dst.Pod.Name {
		return v // a pod cannot block access to itself
	}
	if src.Pod != nil {
		v.Egress = c.side(src.Pod, dst, dst, networkingv1.PolicyTypeEgress, proto, port)
	}
	if dst.Pod != nil {
		v.Ingress = c.side(dst.Pod, src, dst, networkingv1.PolicyTypeIngress, proto, port)
	}
	return v
}

func (c *Cluster) nsLabels(name string) labels.Set {
	out := labels.Set{"kubernetes.io/metadata.name": name}
	for _, ns := range c.Namespaces {
		if ns.Name == name {
			for k, v := range ns.Labels {
				out[k] = v
			}
		}
	}
	return out
}

func matches(s *metav1.LabelSelector, l map[string]string) bool {
	sel, err := metav1.LabelSelectorAsSelector(s)
	if err != nil {
		return false
	}
	return sel.Matches(labels.Set(l))
}

func hasType(np *networkingv1.NetworkPolicy, t networkingv1.PolicyType) bool {
	types := np.Spec.PolicyTypes
	if len(types) == 0 {
		types = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
		if len(np.Spec.Egress) > 0 {
			types = append(types, networkingv1.PolicyTypeEgress)
		}
	}
	for _, x := range types {
		if x == t {
			return true
		}
	}
	return false
}

// side decides for pod (the subject) against peer; dst is the connection's destination,
// whose container ports resolve named ports.
func (c *Cluster) side(pod *corev1.Pod, peer, dst Peer, t networkingv1.PolicyType, proto corev1.Protocol, port int32) bool {
	isolated := false
	for i := range c.Policies {
		np := &c.Policies[i]
		if np.Namespace != pod.Namespace || !matches(&np.Spec.PodSelector, pod.Labels) || !hasType(np, t) {
			continue
		}
		isolated = true
		if t == networkingv1.PolicyTypeIngress {
			for _, r := range np.Spec.Ingress {
				if c.peersMatch(np, r.From, peer) && portsMatch(r.Ports, dst, proto, port) {
					return true
				}
			}
		} else {
			for _, r := range np.Spec.Egress {
				if c.peersMatch(np, r.To, peer) && portsMatch(r.Ports, dst, proto, port) {
					return true
				}
			}
		}
	}
	return !isolated
}

func (c *Cluster) peersMatch(np *networkingv1.NetworkPolicy, peers []networkingv1.NetworkPolicyPeer, peer Peer) bool {
	if len(peers) == 0 {
		return true
	}
	for _, p := range peers {
		if p.IPBlock != nil {
			if inBlock(p.IPBlock, peer.Addr) {
				return true
			}
			continue
		}
		if peer.Pod == nil {
			continue
		}
		if p.NamespaceSelector == nil {
			if peer.Pod.Namespace != np.Namespace {
				continue
			}
		} else if !matches(p.NamespaceSelector, c.nsLabels(peer.Pod.Namespace)) {
			continue
		}
		if p.PodSelector != nil && !matches(p.PodSelector, peer.Pod.Labels) {
			continue
		}
		return true
	}
	return false
}

func inBlock(b *networkingv1.IPBlock, a netip.Addr) bool {
	if !a.IsValid() {
		return false
	}
	c, err := netip.ParsePrefix(b.CIDR)
	if err != nil || !c.Contains(a) {
		return false
	}
	for _, e := range b.Except {
		x, err := netip.ParsePrefix(e)
		if err == nil && x.Contains(a) {
			return false
		}
	}
	return true
}

func portsMatch(ports []networkingv1.NetworkPolicyPort, dst Peer, proto corev1.Protocol, port int32) bool {
	if len(ports) == 0 {
		return true
	}
	for _, p := range ports {
		want := corev1.ProtocolTCP
		if p.Protocol != nil {
			want = *p.Protocol
		}
		if want != proto {
			continue
		}
		if p.Port == nil {
			return true
		}
		if p.Port.Type == 0 {
			end := p.Port.IntVal
			if p.EndPort != nil {
				end = *p.EndPort
			}
			if port >= p.Port.IntVal && port <= end {
				return true
			}
			continue
		}
		if dst.Pod == nil {
			continue
		}
		for _, ctr := range dst.Pod.Spec.Containers {
			for _, cp := range ctr.Ports {
				cproto := cp.Protocol
				if cproto == "" {
					cproto = corev1.ProtocolTCP
				}
				if cp.Name == p.Port.StrVal && cproto == proto && cp.ContainerPort == port {
					return true
				}
			}
		}
	}
	return false
}
