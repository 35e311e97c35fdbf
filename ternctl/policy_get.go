package ternctl

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/tern-net/tern/agent/api"
)

func policyGetCommand(e *env) *cobra.Command {
	c := &cobra.Command{
		Use:   "get NAMESPACE/POD",
		Short: "Which NetworkPolicies select a pod, their resolved rules and verdict counters (asks the agent)",
		Long: `policy get asks the agent which NetworkPolicies select the pod, whether it is isolated
for ingress and egress, each policy's rules as the compiler resolved them (peers as pod
identities with their labels or ipBlock prefixes, protocols and port blocks) and the policy's
counters on this node: packets it allowed (the first packet of each new flow) and denied
(every dropped packet; a denial counts against the policy isolating the pod, the first by
name when several do). With the agent down, 'ternctl bpf policy get' reads the maps.`,
		Example: `  ternctl policy get default/web
  ternctl policy get default/web -o json`,
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: e.completePods,
		RunE: func(cmd *cobra.Command, args []string) error {
			ns, name, ok := strings.Cut(args[0], "/")
			if !ok || ns == "" || name == "" {
				return usageErr("%q: want NAMESPACE/POD", args[0])
			}
			return e.policyGet(cmd.Context(), ns, name)
		},
	}
	return c
}

func (e *env) policyGet(ctx context.Context, ns, name string) error {
	v, err := e.client().Policy(ctx, api.PodRef{Namespace: ns, Name: name})
	if err != nil {
		return e.agentErr(fmt.Sprintf("policy of pod %s/%s", ns, name), err)
	}
	return e.render(v, func() *table { return policyTable(v) })
}

// policyTable prints a PolicyView: a summary, then one row per rule (a policy without
// rules, one that only isolates, gets one row).
func policyTable(v api.PolicyView) *table {
	iso := []string{}
	if v.IsolatedIngress {
		iso = append(iso, "ingress")
	}
	if v.IsolatedEgress {
		iso = append(iso, "egress")
	}
	pod := v.Pod
	if pod == "" {
		pod = v.Address
	} else if v.Address != "" {
		pod += " (" + v.Address + ")"
	}
	t := &table{pre: []string{
		fmt.Sprintf("pod %s  identity %d  isolated %s  audit %v", orDash(pod), v.Identity, orDash(strings.Join(iso, ",")), v.Audit)},
		header: []string{"POLICY", "SLOT", "DIRECTION", "PEER", "PROTO", "PORTS", "ALLOWED", "DENIED"}}
	if v.Enforced != nil && !*v.Enforced {
		t.pre = append(t.pre, "the pod's endpoint has enforcement off: these rules are not applied")
	}
	counts := func(c api.PolicyCounterPair, dir string) (string, string) {
		x := c.Ingress
		if dir == "egress" {
			x = c.Egress
		}
		return strconv.FormatUint(x.AllowedPackets, 10), strconv.FormatUint(x.DeniedPackets, 10)
	}
	for _, p := range v.Policies {
		slot := strconv.Itoa(int(p.Slot))
		if len(p.Rules) == 0 {
			for _, d := range []string{"ingress", "egress"} {
				a, dn := counts(p.Counters, d)
				t.add(p.Name, slot, d, "(isolates, allows nothing)", "-", "-", a, dn)
			}
			continue
		}
		for _, r := range p.Rules {
			a, dn := counts(p.Counters, r.Direction)
			t.add(p.Name, slot, r.Direction, r.Peer, r.Protocol, r.Ports, a, dn)
		}
	}
	return t
}
