package kube

import (
	"context"
	"errors"
	"fmt"

	corev1 "k8s.io/api/core/v1"

	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/nodereport"
)

// startNodeReport runs the Node's IPAM report (annotations and the TernPodIPsExhausted
// condition) and hears every allocation, for the Events on pods that got no address.
func (c *Component) startNodeReport(ctx context.Context, node string) {
	c.reporter = nodereport.New(c.client, node, c.snapshot, c.opts.ReportInterval, c.log)
	c.a.OnAllocate(c.allocated)
	c.wg.Add(1)
	go func() { defer c.wg.Done(); c.reporter.Run(ctx) }()
}

func (c *Component) snapshot() nodereport.Snapshot {
	pool := c.a.Pool()
	st := pool.Status()
	c.mu.Lock()
	why := c.exhausted
	c.mu.Unlock()
	return nodereport.Snapshot{ENIIPs: st.InUseByENI(), MaxPods: st.Capacity.MaxPods, InUse: st.InUse,
		Exhausted: why != "", Reason: why}
}

// allocated hears every allocation the CNI asked for. A failure becomes a Warning Event on
// the pod with the cloud's error code, where `kubectl describe pod` shows it.
func (c *Component) allocated(key ipam.PodKey, err error) {
	if err == nil {
		c.mu.Lock()
		c.exhausted = ""
		c.mu.Unlock()
		c.reporter.Changed()
		return
	}
	reason, code := "TernIPAllocationFailed", ""
	var apiErr *aliyun.APIError
	if errors.As(err, &apiErr) {
		code = apiErr.Code
	}
	if errors.Is(err, ipam.ErrVSwitchExhausted) || errors.Is(err, ipam.ErrNodeFull) {
		reason = "TernPodIPsExhausted"
		c.mu.Lock()
		c.exhausted = err.Error()
		c.mu.Unlock()
		c.reporter.Changed()
	}
	msg := err.Error()
	if code != "" {
		msg = fmt.Sprintf("cloud error %s: %v", code, err)
	}
	ref := &corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: key.Namespace, Name: key.Name}
	c.recorder.Event(ref, corev1.EventTypeWarning, reason, boundEventMessage(msg))
}
