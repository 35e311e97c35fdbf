package agent

import (
	"context"
	"fmt"
	"net/netip"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/tern-net/tern/endpoint"
	"github.com/tern-net/tern/ipam"
)

// A pool that starts on an empty IPAM store recovers the node's ENIs from the cloud, and asks
// livePods which of their addresses the node's live pods hold (ipam/recover.go): a store can
// be lost while the pods run (deleted by hand, a state directory on a new volume), and an
// address taken for idle would go to a second pod. Three views survive the store, and the
// union of them is taken (an address any of them calls live is kept):
//
//   - the sandbox table (SandboxStatePath): every sandbox tern-cni attached, with its
//     container ID, pod and address. The only view with the sandbox ID, so a recovered
//     allocation it names is released by the sandbox's own DEL. It lives beside the store and
//     may be lost with it; only records whose host veth still exists count;
//   - the endpoint registry (pinned BPF map under the pin root, not on the state disk): the
//     address of every pod whose host veth exists, without names;
//   - the apiserver: the Pods bound to this node with status.podIPs (what Terway rebuilds its
//     pool from). With a kubeconfig it must answer: until it does, the pool holds the
//     addresses (the agent logs it and retries), since a pod the datapath no longer records
//     (its pins removed) may still run.
//
// An address only the registry knows gets a name of its own (namespace tern-recovered); the
// agent's GC keeps it, like every recovered allocation without a sandbox ID, while a live
// host veth carries its address.
func (a *Agent) livePods(ctx context.Context) (map[netip.Addr]ipam.PodKey, error) {
	var eps []endpoint.Endpoint
	if reg := a.endpointRegistry(); reg != nil {
		eps = reg.List()
	}
	table, _ := a.sandboxState()
	a.mu.Lock()
	client := a.kinds.client
	a.mu.Unlock()
	if client == nil {
		c, err := a.kubeClient()
		if err != nil {
			return nil, err
		}
		client = c
	}
	live, err := livePodsFrom(ctx, eps, table.list(), hostVethAlive, client, a.cfg.NodeName)
	if err != nil {
		return nil, err
	}
	a.log.Info("the IPAM store was empty: the node's live pods, from the sandbox table, the endpoint registry and the apiserver",
		zap.Int("addresses", len(live)), zap.Int("endpoints", len(eps)), zap.Bool("apiserver", client != nil))
	return live, nil
}

// recoveredNamespace names an address only the endpoint registry knows.
const recoveredNamespace = "tern-recovered"

// livePodsFrom is livePods over its sources; client may be nil (no kubeconfig).
func livePodsFrom(ctx context.Context, eps []endpoint.Endpoint, recs []sandboxRecord, alive func(int) bool,
	client kubernetes.Interface, node string) (map[netip.Addr]ipam.PodKey, error) {
	out := map[netip.Addr]ipam.PodKey{}
	for _, r := range recs {
		ns, name, ok := splitPod(r.Pod)
		if !ok || !r.IP.IsValid() || r.ContainerID == "" || !alive(r.IfIndex) {
			continue
		}
		out[r.IP] = ipam.PodKey{Namespace: ns, Name: name, ContainerID: r.ContainerID}
	}
	if client != nil {
		pods, err := client.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node})
		if err != nil {
			return nil, fmt.Errorf("list the pods of node %s on the apiserver: %w", node, err)
		}
		for i := range pods.Items {
			p := &pods.Items[i]
			if p.Spec.HostNetwork || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
				continue
			}
			for _, pip := range p.Status.PodIPs {
				ip, err := netip.ParseAddr(pip.IP)
				if err != nil {
					continue
				}
				if _, known := out[ip]; !known {
					out[ip] = ipam.RecoveredKey(p.Namespace, p.Name)
				}
			}
		}
	}
	for _, e := range eps {
		if _, known := out[e.Addr]; known || !e.Addr.IsValid() || !alive(e.IfIndex) {
			continue
		}
		if ns, name, ok := splitPod(e.Pod); ok {
			out[e.Addr] = ipam.RecoveredKey(ns, name)
			continue
		}
		out[e.Addr] = ipam.RecoveredKey(recoveredNamespace, fmt.Sprintf("ifindex-%d", e.IfIndex))
	}
	return out, nil
}

// splitPod splits "namespace/name".
func splitPod(s string) (ns, name string, ok bool) {
	for i := 0; i < len(s); i++ {
		if s[i] == '/' {
			return s[:i], s[i+1:], i > 0 && i < len(s)-1
		}
	}
	return "", "", false
}

// liveEndpointAt says whether a live host veth carries ip (the endpoint registry's record of
// it, its veth still there).
func (a *Agent) liveEndpointAt(ip netip.Addr) bool {
	reg := a.endpointRegistry()
	if reg == nil {
		return false
	}
	for _, e := range reg.List() {
		if e.Addr == ip && hostVethAlive(e.IfIndex) {
			return true
		}
	}
	return false
}

// recoveredView judges recovered allocations in one GC pass; the apiserver is read at most
// once, and only when a recovered allocation has no live host veth.
type recoveredView struct {
	read   bool
	err    error
	podIPs map[netip.Addr]string // address -> namespace/name, non-terminal pods of this node
}

// holds says whether the recovered allocation key at ip is still its pod's. Unsure (the
// apiserver unreachable) is yes: a leak until the next pass, never an address given twice.
func (v *recoveredView) holds(ctx context.Context, a *Agent, key ipam.PodKey, ip netip.Addr) bool {
	if a.liveEndpointAt(ip) {
		return true
	}
	if key.Namespace == recoveredNamespace {
		return false // only the registry knew it, and its veth is gone
	}
	if !v.read {
		v.read = true
		v.podIPs, v.err = a.nodePodIPs(ctx)
		if v.err != nil {
			a.log.Warn("GC: cannot read this node's pods; keeping the recovered allocations without a live host veth", zap.Error(v.err))
		}
	}
	if v.err != nil {
		return true
	}
	return v.podIPs[ip] == key.Namespace+"/"+key.Name
}

// nodePodIPs lists the addresses of this node's non-terminal pods; none without a kubeconfig.
func (a *Agent) nodePodIPs(ctx context.Context) (map[netip.Addr]string, error) {
	client, err := a.kubeClient()
	if err != nil || client == nil {
		return map[netip.Addr]string{}, err
	}
	live, err := livePodsFrom(ctx, nil, nil, func(int) bool { return false }, client, a.cfg.NodeName)
	if err != nil {
		return nil, err
	}
	out := make(map[netip.Addr]string, len(live))
	for ip, k := range live {
		out[ip] = k.Namespace + "/" + k.Name
	}
	return out, nil
}
