package kube

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/record"

	"github.com/tern-net/tern/agent"

	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/nodereport"
	"github.com/tern-net/tern/ipam/trunk"
)

// nodeReport is the Node report job: the Node's IPAM annotations and TernPodIPsExhausted
// condition (ipam/nodereport), and the Warning Events on pods that got no address. It runs
// only with a pool.
type nodeReport struct {
	deps     agent.Deps
	client   kubernetes.Interface
	recorder record.EventRecorder
	interval time.Duration
	log      *zap.Logger

	reporter *nodereport.Reporter
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	mu        sync.Mutex
	exhausted string // why the last allocation failed for lack of addresses; "" when fine
}

// Start runs the report and hears every allocation the CNI asks for.
func (r *nodeReport) Start(ctx context.Context, node string) {
	ctx, r.cancel = context.WithCancel(ctx)
	r.reporter = nodereport.New(r.client, node, r.snapshot, r.interval, r.log)
	r.deps.OnAllocate(r.allocated)
	r.wg.Add(1)
	go func() { defer r.wg.Done(); r.reporter.Run(ctx) }()
	if n, ok := r.deps.Pool.(*ipam.Node); ok {
		if id, quota, ok := n.TrunkENI(); ok {
			r.wg.Add(1)
			go func() { defer r.wg.Done(); r.publishTrunk(ctx, node, id, quota) }()
		}
	}
}

// publishTrunk puts Terway's trunking annotations on the Node (trunk.AnnotateNode; the
// snapshot's extended resources carry aliyun/member-eni), retrying until the apiserver takes
// them.
func (r *nodeReport) publishTrunk(ctx context.Context, node, trunkID string, quota int) {
	delay := 200 * time.Millisecond
	for {
		err := trunk.AnnotateNode(ctx, r.client, node, trunkID, quota)
		if err == nil {
			return
		}
		r.log.Warn("could not publish the node's trunk ENI on its Node; retrying", zap.Error(err))
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay = min(2*delay, 10*time.Second)
	}
}

// Stop ends the report loop.
func (r *nodeReport) Stop() {
	if r.cancel != nil {
		r.cancel()
	}
	r.wg.Wait()
}

// Changed asks for a report soon (after addresses were released, say).
func (r *nodeReport) Changed() { r.reporter.Changed() }

func (r *nodeReport) snapshot() nodereport.Snapshot {
	pool := r.deps.Pool
	st := pool.Status()
	r.mu.Lock()
	why := r.exhausted
	r.mu.Unlock()
	s := nodereport.Snapshot{ENIIPs: st.InUseByENI(), MaxPods: st.Capacity.MaxPods, InUse: st.InUse,
		Exhausted: why != "", Reason: why, ExtendedResources: nodereport.ExtendedResourcesOf(st.Kinds)}
	if st.PodCIDR.IsValid() {
		// VPC route mode: no ENI holds the pods' addresses.
		s.ENIIPs, s.PodCIDR = nil, st.PodCIDR.String()
	}
	return s
}

// allocated hears every allocation the CNI asked for. A failure becomes a Warning Event on
// the pod with the cloud's error code, where `kubectl describe pod` shows it.
func (r *nodeReport) allocated(key ipam.PodKey, err error) {
	if err == nil {
		r.mu.Lock()
		r.exhausted = ""
		r.mu.Unlock()
		r.reporter.Changed()
		return
	}
	reason, code := "TernIPAllocationFailed", ""
	var apiErr *aliyun.APIError
	if errors.As(err, &apiErr) {
		code = apiErr.Code
	}
	if errors.Is(err, ipam.ErrVSwitchExhausted) || errors.Is(err, ipam.ErrNodeFull) {
		reason = "TernPodIPsExhausted"
		r.mu.Lock()
		r.exhausted = err.Error()
		r.mu.Unlock()
		r.reporter.Changed()
	}
	msg := err.Error()
	if code != "" {
		msg = fmt.Sprintf("cloud error %s: %v", code, err)
	}
	ref := &corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: key.Namespace, Name: key.Name}
	r.recorder.Event(ref, corev1.EventTypeWarning, reason, boundEventMessage(msg))
}
