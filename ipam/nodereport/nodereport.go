// Package nodereport publishes the node's IPAM state on its Kubernetes Node, where operators
// and schedulers look: the ENIs and the addresses pods use (the
// k8s.aliyun.com/allocated-eniips annotation), the pod capacity (Terway's
// k8s.aliyun.com/max-available-ip), and a Node condition when addresses run out.
//
// In the VPC route mode no ENI holds pod addresses: the node's pod CIDR is its spec.podCIDR,
// which the Node already shows. Terway's VPC mode publishes neither annotation (its daemon
// sets max-available-ip only when the mode is not VPC); tern removes allocated-eniips there
// (a node switched from ENIIP would otherwise keep a stale one) and keeps max-available-ip,
// the pod capacity of the CIDR (its addresses less network and broadcast), because operators'
// checks compare it with the node's pods capacity in every mode.
package nodereport

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"

	"github.com/tern-net/tern/ipam"
)

const (
	// AnnotationAllocatedENIIPs maps each ENI ID to the addresses pods use on it (JSON).
	AnnotationAllocatedENIIPs = "k8s.aliyun.com/allocated-eniips"
	// AnnotationMaxAvailableIP is how many pod addresses this node can have at most.
	AnnotationMaxAvailableIP = "k8s.aliyun.com/max-available-ip"
	// ConditionIPExhausted is True while new pods cannot get an address.
	ConditionIPExhausted corev1.NodeConditionType = "TernPodIPsExhausted"
)

// Snapshot is what the reporter publishes.
type Snapshot struct {
	ENIIPs map[string][]string // ENI ID → addresses in use
	// PodCIDR is set in the VPC route mode: no allocated-eniips annotation, MaxPods is the
	// CIDR's capacity.
	PodCIDR   string
	MaxPods   int
	InUse     int
	Exhausted bool   // the last allocation failed for lack of addresses
	Reason    string // why, with the cloud's error code when there was one
	// ExtendedResources are the Node's extended resources for optional kinds (aliyun/eni →
	// how many exclusive ENIs the node can hold now), set in its status capacity and
	// allocatable, where the scheduler counts pods' requests against them.
	ExtendedResources map[string]int
}

// ExtendedResourcesOf picks the kinds that have an extended resource (nil when none does).
func ExtendedResourcesOf(kinds []ipam.KindCapacity) map[string]int {
	var out map[string]int
	for _, k := range kinds {
		if k.ExtendedResource == "" {
			continue
		}
		if out == nil {
			out = map[string]int{}
		}
		out[k.ExtendedResource] = k.Capacity
	}
	return out
}

// Source gives the current snapshot; the agent builds it from the IPAM pool.
type Source func() Snapshot

// Reporter patches the Node when the snapshot changes, and at least every Interval.
type Reporter struct {
	client   kubernetes.Interface
	node     string
	source   Source
	interval time.Duration
	log      *zap.Logger
	kick     chan struct{}
	last     string
}

// New makes a reporter for node. Nothing runs until Run.
func New(client kubernetes.Interface, node string, source Source, interval time.Duration, log *zap.Logger) *Reporter {
	if interval <= 0 {
		interval = 30 * time.Second
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &Reporter{client: client, node: node, source: source, interval: interval,
		log: log.Named("nodereport"), kick: make(chan struct{}, 1)}
}

// Changed asks for a report soon (after an allocation or release). It never blocks.
func (r *Reporter) Changed() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Run reports until ctx ends. Several changes in quick succession make one patch.
func (r *Reporter) Run(ctx context.Context) error {
	t := time.NewTicker(r.interval)
	defer t.Stop()
	for {
		if err := r.Report(ctx); err != nil {
			r.log.Warn("could not update the Node's IPAM annotations; will retry", zap.Error(err))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			r.last = "" // re-assert periodically even if unchanged (someone may have edited it)
		case <-r.kick:
			// Coalesce a burst of pod events into one patch.
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
}

// Report patches the Node now if the snapshot differs from the last one written.
func (r *Reporter) Report(ctx context.Context) error {
	s := r.source()
	eniips, err := json.Marshal(s.ENIIPs)
	if err != nil {
		return err
	}
	annotations := map[string]any{
		AnnotationAllocatedENIIPs: string(eniips),
		AnnotationMaxAvailableIP:  strconv.Itoa(s.MaxPods),
	}
	if s.PodCIDR != "" {
		annotations[AnnotationAllocatedENIIPs] = nil // a merge patch's null removes it
	}
	meta := map[string]any{"metadata": map[string]any{"annotations": annotations}}
	body, err := json.Marshal(meta)
	if err != nil {
		return err
	}
	cond := corev1.NodeCondition{Type: ConditionIPExhausted, Status: corev1.ConditionFalse,
		Reason: "PodIPsAvailable", Message: fmt.Sprintf("%d of %d pod addresses in use", s.InUse, s.MaxPods)}
	if s.PodCIDR != "" {
		cond.Message = fmt.Sprintf("%d of %d pod addresses of pod CIDR %s in use", s.InUse, s.MaxPods, s.PodCIDR)
	}
	if s.Exhausted {
		cond.Status, cond.Reason, cond.Message = corev1.ConditionTrue, "PodIPsExhausted", s.Reason
	}
	ext := ""
	if len(s.ExtendedResources) > 0 {
		b, err := json.Marshal(s.ExtendedResources)
		if err != nil {
			return err
		}
		ext = string(b)
	}
	key := string(body) + ext + string(cond.Status) + cond.Message
	if key == r.last {
		return nil
	}
	if _, err := r.client.CoreV1().Nodes().Patch(ctx, r.node, types.MergePatchType, body, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("patch annotations of node %s: %w", r.node, err)
	}
	if err := r.setStatus(ctx, cond, s.ExtendedResources); err != nil {
		return err
	}
	r.last = key
	return nil
}

// setStatus sets one condition and the extended resources (capacity and allocatable, the way
// an operator advertises extended resources; the kubelet keeps those it does not manage) on the
// Node's status, with the nodes/status update the agent's role grants. The kubelet writes the
// same status every few seconds, so a conflict is expected now and then: re-read and try again.
func (r *Reporter) setStatus(ctx context.Context, c corev1.NodeCondition, ext map[string]int) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error { return r.trySetStatus(ctx, c, ext) })
}

func (r *Reporter) trySetStatus(ctx context.Context, c corev1.NodeCondition, ext map[string]int) error {
	node, err := r.client.CoreV1().Nodes().Get(ctx, r.node, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get node %s: %w", r.node, err)
	}
	for name, n := range ext {
		q := *resource.NewQuantity(int64(n), resource.DecimalSI)
		if node.Status.Capacity == nil {
			node.Status.Capacity = corev1.ResourceList{}
		}
		if node.Status.Allocatable == nil {
			node.Status.Allocatable = corev1.ResourceList{}
		}
		node.Status.Capacity[corev1.ResourceName(name)] = q
		node.Status.Allocatable[corev1.ResourceName(name)] = q
	}
	now := metav1.Now()
	c.LastHeartbeatTime = now
	c.LastTransitionTime = now
	found := false
	for i, old := range node.Status.Conditions {
		if old.Type != c.Type {
			continue
		}
		found = true
		if old.Status == c.Status {
			c.LastTransitionTime = old.LastTransitionTime
		}
		node.Status.Conditions[i] = c
	}
	if !found {
		node.Status.Conditions = append(node.Status.Conditions, c)
	}
	_, err = r.client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	if err != nil && !apierrors.IsConflict(err) {
		return fmt.Errorf("set condition %s on node %s: %w", c.Type, r.node, err)
	}
	return err
}
