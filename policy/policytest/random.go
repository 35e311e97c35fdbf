// Package policytest builds random NetworkPolicy scenarios (namespaces, pods, policies and
// probes) for the tests that compare the compiler, the simulator and the datapath with
// policy/reference. Scenarios come from a seed, so a failure names the seed that
// reproduces it.
package policytest

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/reference"
)

// Probe is one connection to decide: "NS/POD" or an IPv4 address at each end.
type Probe struct {
	From     string `json:"from"`
	To       string `json:"to"`
	Port     uint16 `json:"port"`
	Protocol string `json:"protocol"`
}

// Scenario is a cluster and the probes to run against it.
type Scenario struct {
	Seed   uint64
	State  policy.State
	Probes []Probe
}

// External addresses the probes use, chosen inside and outside the ipBlocks below.
var externals = []string{"192.168.1.5", "192.168.7.7", "172.16.0.3", "8.8.8.8", "10.0.1.200", "10.9.0.1"}

var ipBlocks = []networkingv1.IPBlock{
	{CIDR: "10.0.0.0/16", Except: []string{"10.0.1.0/24"}},
	{CIDR: "192.168.0.0/16", Except: []string{"192.168.1.0/24"}},
	{CIDR: "0.0.0.0/0", Except: []string{"10.0.0.0/8"}},
	{CIDR: "172.16.0.0/12"},
	{CIDR: "10.0.1.0/24"},
}

func pick[T any](r *rand.Rand, xs []T) T { return xs[r.IntN(len(xs))] }

func randLabels(r *rand.Rand, keys map[string][]string) map[string]string {
	out := map[string]string{}
	for k, vs := range keys {
		if r.IntN(3) > 0 {
			out[k] = pick(r, vs)
		}
	}
	return out
}

var podKeys = map[string][]string{"app": {"web", "db", "api"}, "tier": {"fe", "be"}}
var nsKeys = map[string][]string{"team": {"a", "b"}, "env": {"prod", "dev"}}

func randSelector(r *rand.Rand, keys map[string][]string) *metav1.LabelSelector {
	s := &metav1.LabelSelector{}
	switch r.IntN(5) {
	case 0: // empty: everything
	case 1, 2:
		k := pick(r, []string{"app", "tier", "team", "env"})
		if vs, ok := keys[k]; ok {
			s.MatchLabels = map[string]string{k: pick(r, vs)}
		} else {
			s.MatchLabels = map[string]string{"kubernetes.io/metadata.name": pick(r, []string{"ns0", "ns1", "ns2"})}
		}
	case 3:
		for k, vs := range keys {
			s.MatchExpressions = append(s.MatchExpressions, metav1.LabelSelectorRequirement{
				Key: k, Operator: pick(r, []metav1.LabelSelectorOperator{metav1.LabelSelectorOpIn, metav1.LabelSelectorOpNotIn}),
				Values: []string{pick(r, vs)},
			})
			break
		}
	case 4:
		for k := range keys {
			s.MatchExpressions = append(s.MatchExpressions, metav1.LabelSelectorRequirement{
				Key: k, Operator: pick(r, []metav1.LabelSelectorOperator{metav1.LabelSelectorOpExists, metav1.LabelSelectorOpDoesNotExist}),
			})
			break
		}
	}
	return s
}

func proto(p corev1.Protocol) *corev1.Protocol { return &p }

// Random builds the scenario of seed: 3 namespaces, 4–10 pods, 1–4 policies, nProbes probes.
func Random(seed uint64, nProbes int) Scenario {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	sc := Scenario{Seed: seed}
	for i := range 3 {
		sc.State.Namespaces = append(sc.State.Namespaces, corev1.Namespace{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("ns%d", i), Labels: randLabels(r, nsKeys)}})
	}
	nPods := 4 + r.IntN(7)
	for i := range nPods {
		p := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: fmt.Sprintf("ns%d", r.IntN(3)), Name: fmt.Sprintf("p%d", i),
			Labels: randLabels(r, podKeys)}}
		var ports []corev1.ContainerPort
		if r.IntN(2) == 0 {
			ports = append(ports, corev1.ContainerPort{Name: "http", ContainerPort: pick(r, []int32{80, 8080})})
		}
		if r.IntN(2) == 0 {
			ports = append(ports, corev1.ContainerPort{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP})
		}
		if r.IntN(3) == 0 {
			ports = append(ports, corev1.ContainerPort{Name: "sctp", ContainerPort: 9000, Protocol: corev1.ProtocolSCTP})
		}
		p.Spec.Containers = []corev1.Container{{Name: "c", Image: "x", Ports: ports}}
		// Pods live in 10.0.0.0/16, some inside the 10.0.1.0/24 that ipBlocks carve out.
		p.Status.PodIP = fmt.Sprintf("10.0.%d.%d", r.IntN(3), 10+i)
		sc.State.Pods = append(sc.State.Pods, p)
	}
	nPol := 1 + r.IntN(4)
	for i := range nPol {
		np := networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: fmt.Sprintf("ns%d", r.IntN(3)), Name: fmt.Sprintf("np%d", i)}}
		np.Spec.PodSelector = *randSelector(r, podKeys)
		switch r.IntN(4) {
		case 1:
			np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
		case 2:
			np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
		case 3:
			np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
		}
		for range r.IntN(3) {
			peers, ports := randRule(r, false)
			np.Spec.Ingress = append(np.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{From: peers, Ports: ports})
		}
		for range r.IntN(3) {
			peers, ports := randRule(r, true)
			np.Spec.Egress = append(np.Spec.Egress, networkingv1.NetworkPolicyEgressRule{To: peers, Ports: ports})
		}
		sc.State.Policies = append(sc.State.Policies, np)
	}
	ends := append([]string(nil), externals...)
	for _, p := range sc.State.Pods {
		// Pods are picked more often than external addresses.
		ends = append(ends, p.Namespace+"/"+p.Name, p.Namespace+"/"+p.Name)
	}
	for range nProbes {
		from, to := pick(r, ends), pick(r, ends)
		for !strings.Contains(from, "/") && !strings.Contains(to, "/") {
			to = pick(r, ends)
		}
		sc.Probes = append(sc.Probes, Probe{From: from, To: to,
			Port:     pick(r, []uint16{80, 53, 8080, 8050, 8100, 8101, 9000, 443, 22}),
			Protocol: pick(r, []string{"TCP", "TCP", "UDP", "SCTP"})})
	}
	return sc
}

// randRule makes one rule's peers and ports (egress rules with a named port and an ipBlock
// peer included: the name resolves on each destination pod inside the block).
func randRule(r *rand.Rand, egress bool) ([]networkingv1.NetworkPolicyPeer, []networkingv1.NetworkPolicyPort) {
	var ports []networkingv1.NetworkPolicyPort
	for range r.IntN(3) {
		var p networkingv1.NetworkPolicyPort
		switch r.IntN(3) {
		case 1:
			p.Protocol = proto(corev1.ProtocolUDP)
		case 2:
			p.Protocol = proto(corev1.ProtocolSCTP)
		}
		switch r.IntN(5) {
		case 0: // every port of the protocol
		case 1, 2:
			v := intstr.FromInt32(pick(r, []int32{80, 53, 8080, 9000, 443}))
			p.Port = &v
		case 3:
			v := intstr.FromInt32(8000)
			end := int32(8100)
			p.Port, p.EndPort = &v, &end
		case 4:
			v := intstr.FromString(pick(r, []string{"http", "dns", "sctp"}))
			p.Port = &v
		}
		ports = append(ports, p)
	}
	var peers []networkingv1.NetworkPolicyPeer
	for range r.IntN(3) {
		var p networkingv1.NetworkPolicyPeer
		switch r.IntN(4) {
		case 0:
			p.PodSelector = randSelector(r, podKeys)
		case 1:
			p.NamespaceSelector = randSelector(r, nsKeys)
		case 2:
			p.PodSelector = randSelector(r, podKeys)
			p.NamespaceSelector = randSelector(r, nsKeys)
		case 3:
			b := pick(r, ipBlocks)
			b.Except = append([]string(nil), b.Except...)
			p.IPBlock = &b
		}
		peers = append(peers, p)
	}
	return peers, ports
}

// Resolve turns a probe end into a reference.Peer.
func Resolve(st *policy.State, end string) (reference.Peer, error) {
	if ns, name, ok := strings.Cut(end, "/"); ok {
		for i := range st.Pods {
			p := &st.Pods[i]
			if p.Namespace == ns && p.Name == name {
				a, _ := netip.ParseAddr(p.Status.PodIP)
				return reference.Peer{Pod: p, Addr: a}, nil
			}
		}
		return reference.Peer{}, fmt.Errorf("probe end %q: no pod %s in namespace %s", end, name, ns)
	}
	a, err := netip.ParseAddr(end)
	if err != nil {
		return reference.Peer{}, fmt.Errorf("probe end %q is neither NS/POD nor an IPv4 address", end)
	}
	for i := range st.Pods {
		if st.Pods[i].Status.PodIP == end {
			return reference.Peer{Pod: &st.Pods[i], Addr: a}, nil
		}
	}
	return reference.Peer{Addr: a}, nil
}

// Reference decides every probe of sc with policy/reference.
func Reference(sc *Scenario) ([]reference.Verdict, error) {
	c := reference.Cluster{Namespaces: sc.State.Namespaces, Pods: sc.State.Pods, Policies: sc.State.Policies}
	var out []reference.Verdict
	for _, p := range sc.Probes {
		src, err := Resolve(&sc.State, p.From)
		if err != nil {
			return nil, err
		}
		dst, err := Resolve(&sc.State, p.To)
		if err != nil {
			return nil, err
		}
		out = append(out, c.Decide(src, dst, corev1.Protocol(p.Protocol), int32(p.Port)))
	}
	return out, nil
}

// Service is a protocol and port every pod of a RandomOver scenario serves.
type Service struct {
	Protocol string // TCP, UDP or SCTP
	Port     uint16
}

// RandomOver is a random scenario over given pods (their namespaces, names, container
// ports and addresses stay; their labels, the namespaces' labels and the policies are
// drawn from seed). The lab uses it to compare the live datapath with the simulator on pods
// it cannot recreate per scenario. With nProbes > 0 the probes are that many random ones
// on the given services; with nProbes 0 they are every ordered pair of distinct pods on
// every service.
func RandomOver(seed uint64, pods []corev1.Pod, services []Service, nProbes int) Scenario {
	r := rand.New(rand.NewPCG(seed, seed^0x51ed2701f3a5c4b9))
	sc := Scenario{Seed: seed}
	seen := map[string]bool{}
	for _, p := range pods {
		if !seen[p.Namespace] {
			seen[p.Namespace] = true
			sc.State.Namespaces = append(sc.State.Namespaces, corev1.Namespace{
				ObjectMeta: metav1.ObjectMeta{Name: p.Namespace, Labels: randLabels(r, nsKeys)}})
		}
		q := *p.DeepCopy()
		q.Labels = randLabels(r, podKeys)
		sc.State.Pods = append(sc.State.Pods, q)
	}
	var nsNames []string
	for _, ns := range sc.State.Namespaces {
		nsNames = append(nsNames, ns.Name)
	}
	for i := range 1 + r.IntN(4) {
		np := networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: pick(r, nsNames), Name: fmt.Sprintf("np%d", i)}}
		np.Spec.PodSelector = *randSelector(r, podKeys)
		switch r.IntN(4) {
		case 1:
			np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
		case 2:
			np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
		case 3:
			np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
		}
		for range r.IntN(3) {
			peers, ports := randRule(r, false)
			np.Spec.Ingress = append(np.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{From: peers, Ports: ports})
		}
		for range r.IntN(3) {
			peers, ports := randRule(r, true)
			np.Spec.Egress = append(np.Spec.Egress, networkingv1.NetworkPolicyEgressRule{To: peers, Ports: ports})
		}
		// Namespace selectors in the generator name ns0..ns2; point them at these namespaces.
		sc.State.Policies = append(sc.State.Policies, renameNamespaces(np, nsNames))
	}
	key := func(p corev1.Pod) string { return p.Namespace + "/" + p.Name }
	if nProbes == 0 {
		for _, from := range sc.State.Pods {
			for _, to := range sc.State.Pods {
				if key(from) == key(to) {
					continue
				}
				for _, s := range services {
					sc.Probes = append(sc.Probes, Probe{From: key(from), To: key(to), Port: s.Port, Protocol: s.Protocol})
				}
			}
		}
		return sc
	}
	for range nProbes {
		from, to := pick(r, sc.State.Pods), pick(r, sc.State.Pods)
		s := pick(r, services)
		sc.Probes = append(sc.Probes, Probe{From: key(from), To: key(to), Port: s.Port, Protocol: s.Protocol})
	}
	return sc
}

func renameNamespaces(np networkingv1.NetworkPolicy, names []string) networkingv1.NetworkPolicy {
	fix := func(s *metav1.LabelSelector) {
		if s == nil {
			return
		}
		if v, ok := s.MatchLabels["kubernetes.io/metadata.name"]; ok {
			var i int
			if _, err := fmt.Sscanf(v, "ns%d", &i); err == nil && i < len(names) {
				s.MatchLabels["kubernetes.io/metadata.name"] = names[i]
			}
		}
	}
	fix(&np.Spec.PodSelector)
	for i := range np.Spec.Ingress {
		for j := range np.Spec.Ingress[i].From {
			fix(np.Spec.Ingress[i].From[j].NamespaceSelector)
			fix(np.Spec.Ingress[i].From[j].PodSelector)
		}
	}
	for i := range np.Spec.Egress {
		for j := range np.Spec.Egress[i].To {
			fix(np.Spec.Egress[i].To[j].NamespaceSelector)
			fix(np.Spec.Egress[i].To[j].PodSelector)
		}
	}
	return np
}
