package policytest

import (
	"fmt"
	"math/rand/v2"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/tern-net/tern/policy"
)

// BigState is 2,000 pods (20 namespaces × 20 apps × 5 replicas, 400 identities) and 1,000
// policies, each selecting one app of its namespace, allowing it in from an app of its
// namespace, a tier of some namespaces and an ipBlock with except on a port, a range and a
// named port, and out to one app in every namespace on a named port.
func BigState() policy.State {
	r := rand.New(rand.NewPCG(1, 2))
	var st policy.State
	for n := range 20 {
		st.Namespaces = append(st.Namespaces, corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
			Name: fmt.Sprintf("ns%d", n), Labels: map[string]string{"team": fmt.Sprintf("t%d", n%5)}}})
	}
	for n := range 20 {
		for app := range 20 {
			for rep := range 5 {
				i := (n*20+app)*5 + rep
				p := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: fmt.Sprintf("ns%d", n), Name: fmt.Sprintf("app%d-%d", app, rep),
					Labels: map[string]string{"app": fmt.Sprintf("app%d", app), "tier": fmt.Sprintf("t%d", app%3)}}}
				p.Spec.Containers = []corev1.Container{{Name: "c", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}
				p.Status.PodIP = fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255)
				st.Pods = append(st.Pods, p)
			}
		}
	}
	http := intstr.FromString("http")
	p80 := intstr.FromInt32(80)
	p9000 := intstr.FromInt32(9000)
	end := int32(9100)
	for i := range 1000 {
		np := networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: fmt.Sprintf("ns%d", i%20), Name: fmt.Sprintf("np%d", i)}}
		np.Spec.PodSelector = metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app%d", r.IntN(20))}}
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
		np.Spec.Ingress = []networkingv1.NetworkPolicyIngressRule{{
			From: []networkingv1.NetworkPolicyPeer{
				{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app%d", r.IntN(20))}}},
				{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": fmt.Sprintf("t%d", r.IntN(5))}},
					PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"tier": "t1"}}},
				{IPBlock: &networkingv1.IPBlock{CIDR: "192.168.0.0/16", Except: []string{fmt.Sprintf("192.168.%d.0/24", r.IntN(16))}}},
			},
			Ports: []networkingv1.NetworkPolicyPort{{Port: &p80}, {Port: &http}, {Port: &p9000, EndPort: &end}},
		}}
		np.Spec.Egress = []networkingv1.NetworkPolicyEgressRule{{
			To:    []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{}, PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "app1"}}}},
			Ports: []networkingv1.NetworkPolicyPort{{Port: &http}},
		}}
		st.Policies = append(st.Policies, np)
	}
	return st
}
