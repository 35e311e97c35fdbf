package agent

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/datapath"
	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/store"
)

// Resource kinds beside the default (ipam.Kinds): the Node's labels turn them on when the agent
// starts (Terway reads its exclusive-ENI label the same way, once), and each pod's annotations
// or extended resource requests choose one.

// kindsState is what the agent keeps to serve optional kinds.
type kindsState struct {
	client kubernetes.Interface // reads Pods whose kind the CNI's annotations do not settle
	on     bool                 // at least one optional kind is on
	trunk  *datapath.Trunk      // the VLAN programs, with the member kind (trunk.go)
}

// kubeClient builds a client from the kubeconfig, nil without one.
func (a *Agent) kubeClient() (kubernetes.Interface, error) {
	if a.cfg.Kubeconfig == "" {
		return nil, nil
	}
	rc, err := clientcmd.BuildConfigFromFlags("", a.cfg.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig %s: %w", a.cfg.Kubeconfig, err)
	}
	return kubernetes.NewForConfig(rc)
}

// nodeLabels reads this Node's labels (none without a kubeconfig). The kubelet may register
// the Node after the agent starts: wait a little, then go on without optional kinds.
func (a *Agent) nodeLabels(ctx context.Context, client kubernetes.Interface) map[string]string {
	if client == nil {
		return nil
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, err := client.CoreV1().Nodes().Get(ctx, a.cfg.NodeName, metav1.GetOptions{})
		if err == nil {
			return n.Labels
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			a.log.Warn("cannot read this Node's labels; optional network resource kinds (exclusive ENI) stay off until the agent restarts", zap.Error(err))
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// withKinds puts the default allocator and the kinds the Node's labels turn on behind one
// ipam.Node. build makes the default allocator with the count of ENIs the other kinds hold.
func (a *Agent) withKinds(ctx context.Context, cloud aliyun.Cloud, st *store.Store, eniCfg eniconfig.Config,
	build func(otherENIs func() int) (ipam.Allocator, error)) (ipam.Allocator, error) {
	client, err := a.kubeClient()
	if err != nil {
		return nil, err
	}
	labels := a.cfg.NodeLabels
	if client != nil {
		labels = a.nodeLabels(ctx, client)
	}
	specs := ipam.EnabledKinds(ipam.NodeInfo{Labels: labels, Config: eniCfg})
	var node *ipam.Node
	others := func(k ipam.Kind) func() int {
		return func() int {
			if node == nil {
				return 0
			}
			return node.ENIsHeldExcept(k)
		}
	}
	base, err := build(others(ipam.KindENIIP))
	if err != nil {
		return nil, err
	}
	var kinds []ipam.Resource
	var tdp *datapath.Trunk
	for _, s := range specs {
		if s.Kind == ipam.KindMember {
			if tdp, err = a.loadTrunk(); err != nil {
				return nil, err
			}
		}
		r, err := s.New(ipam.KindDeps{Cloud: cloud, Store: st, Config: eniCfg, InstanceID: a.cfg.InstanceID,
			NodeName: a.cfg.NodeName, ClusterID: a.cfg.ClusterID, Logger: a.log.Named("ipam"), OtherENIs: others(s.Kind),
			ListingGrace: time.Duration(a.cfg.ListingGrace)})
		if err != nil {
			return nil, fmt.Errorf("network resource kind %s: %w", s.Kind, err)
		}
		kinds = append(kinds, r)
		a.log.Info("network resource kind on", zap.String("kind", string(s.Kind)))
	}
	node = ipam.NewNode(base, kinds, a.log.Named("ipam"))
	a.mu.Lock()
	a.kinds = kindsState{client: client, on: len(kinds) > 0, trunk: tdp}
	a.mu.Unlock()
	return node, nil
}

// allocateFor serves one ADD: the pod's annotations (from the runtime) or, when they ask for
// nothing but the default, the Pod object (annotations and aliyun/eni or aliyun/member-eni
// resource requests, listed by name)
// choose the kind. Nodes with no optional kind never read the Pod.
func (a *Agent) allocateFor(ctx context.Context, pool ipam.Allocator, req api.AllocateRequest, key ipam.PodKey) (ipam.Allocation, error) {
	node, ok := pool.(*ipam.Node)
	a.mu.Lock()
	ks := a.kinds
	a.mu.Unlock()
	if !ok || !ks.on {
		// No optional kind here: a pod whose annotations ask for one is refused with the label
		// to set, rather than silently given a shared address (and none of its own security
		// groups).
		if r, err := ipam.RequestFromPod(key, req.Annotations, false); err == nil && r.Kind != ipam.KindENIIP {
			return ipam.Allocation{}, fmt.Errorf("%w: pod %s/%s asks for %q; this node offers eniip only (label the Node %s=%s for exclusive ENIs, set eni_conf enable_eni_trunking: true for member ENIs)",
				ipam.ErrKindNotOffered, key.Namespace, key.Name, r.Kind, ipam.LabelExclusiveENI, ipam.LabelExclusiveENIOnly)
		}
		return pool.Allocate(ctx, key)
	}
	r, err := ipam.RequestFromPod(key, req.Annotations, false)
	if err != nil {
		return ipam.Allocation{}, err
	}
	if r.Kind == ipam.KindENIIP && ks.client != nil {
		// A list by name, not a get: the agent's role lists and watches pods but may not get
		// them (deploy/manifests/10-rbac.yaml).
		gctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		pods, err := ks.client.CoreV1().Pods(key.Namespace).List(gctx, metav1.ListOptions{FieldSelector: "metadata.name=" + key.Name})
		cancel()
		if err == nil && len(pods.Items) != 1 {
			err = fmt.Errorf("%d pods of that name", len(pods.Items))
		}
		if err != nil {
			// Guessing "shared" could give an exclusive pod the wrong network for its life.
			return ipam.Allocation{}, fmt.Errorf("%w: read pod %s/%s to learn which network resource it asks for: %v", ipam.ErrPoolEmptyTryAgain, key.Namespace, key.Name, err)
		}
		pod := &pods.Items[0]
		if r, err = ipam.RequestFromPod(key, pod.Annotations, requestsResource(pod, ipam.ResourceENI)); err != nil {
			return ipam.Allocation{}, err
		}
		if r.Kind == ipam.KindENIIP && requestsResource(pod, ipam.ResourceMemberENI) {
			r.Kind = ipam.KindMember // Terway's webhook adds aliyun/member-eni to a trunk pod
		}
	}
	return node.AllocateFor(ctx, r)
}

// requestsResource says whether a container asks for an extended resource (aliyun/eni,
// aliyun/member-eni).
func requestsResource(pod *corev1.Pod, name corev1.ResourceName) bool {
	for _, cs := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, c := range cs {
			if _, ok := c.Resources.Requests[name]; ok {
				return true
			}
			if _, ok := c.Resources.Limits[name]; ok {
				return true
			}
		}
	}
	return false
}
