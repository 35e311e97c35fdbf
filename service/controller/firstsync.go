package controller

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"
	"k8s.io/client-go/tools/cache"
)

// FirstSync is how far the controller's first full sync has come. Until it is Done, a pod on
// this node could send to a ClusterIP that is not programmed yet (the first pods on a fresh
// node usually query DNS at once), so the agent is not ready.
type FirstSync struct {
	ServicesListed bool   // the Service informer has its initial list
	SlicesListed   bool   // the EndpointSlice informer has its initial list
	ListError      string // the informers' last list or watch error before they synced
	Services       int    // Services in the initial list
	Translated     int    // of them, translated into frontends so far
	Frontends      int    // frontends the initial list yields (known once all are translated)
	Err            error  // why the last attempt failed; it is retried with backoff
	Done           bool   // every frontend of the initial list is in the BPF maps
}

// String says what the first sync waits for, for /readyz and CNI STATUS.
func (p FirstSync) String() string {
	switch {
	case p.Done:
		return fmt.Sprintf("first sync done: %d Services, %d frontends in the BPF maps", p.Services, p.Frontends)
	case !p.ServicesListed || !p.SlicesListed:
		s := fmt.Sprintf("waiting for the informers' initial lists (Services: %s, EndpointSlices: %s)",
			listed(p.ServicesListed), listed(p.SlicesListed))
		if p.ListError != "" {
			s += "; last error: " + p.ListError + " (check the apiserver address and the agent's RBAC)"
		}
		return s
	case p.Err != nil:
		return fmt.Sprintf("first sync of %d Services (%d frontends) failed, retrying with backoff: %v", p.Services, p.Frontends, p.Err)
	case p.Translated < p.Services || p.Frontends == 0 && p.Services > 0:
		return fmt.Sprintf("informers synced; first sync: %d of %d Services translated", p.Translated, p.Services)
	default:
		return fmt.Sprintf("informers synced; first sync: writing %d frontends of %d Services to the BPF maps", p.Frontends, p.Services)
	}
}

func listed(ok bool) string {
	if ok {
		return "listed"
	}
	return "not listed yet"
}

// progressEvery is how many Services the first sync translates between two reports: often
// enough to show progress on a large cluster, rarely enough to cost nothing.
const progressEvery = 256

// report applies change to the first sync's progress and hands the result to
// Options.Progress. Nothing is reported once the first sync is done.
func (c *Controller) report(change func(*FirstSync)) {
	c.progressMu.Lock()
	defer c.progressMu.Unlock()
	if c.progress.Done {
		return
	}
	change(&c.progress)
	if c.opts.Progress != nil {
		c.opts.Progress(c.progress)
	}
}

// waitForInformers waits for both informers' initial lists, reporting each as it arrives.
// It polls HasSynced, as cache.WaitForCacheSync does; list errors arrive through watchError.
func (c *Controller) waitForInformers(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	reported := false
	var lastSvcs, lastSlices bool
	for {
		svcs, slices := c.svcInformer.HasSynced(), c.sliceInformer.HasSynced()
		if !reported || svcs != lastSvcs || slices != lastSlices {
			c.report(func(p *FirstSync) {
				p.ServicesListed, p.SlicesListed = svcs, slices
				if svcs && slices {
					p.ListError = ""
				}
			})
			reported, lastSvcs, lastSlices = true, svcs, slices
		}
		if svcs && slices {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("service informers did not sync: %w", ctx.Err())
		case <-t.C:
		}
	}
}

// watchError keeps client-go's handling of informer errors (logging) and, before the first
// sync, records the error so that readiness says why the node waits. client-go calls it for
// errors it does not retry by itself (forbidden, say); errors it retries inside a watch-list
// request (connection refused) do not reach it, and the reason then only says what is not
// listed yet.
func (c *Controller) watchError(ctx context.Context, r *cache.Reflector, err error) {
	cache.DefaultWatchErrorHandler(ctx, r, err)
	if c.synced.Load() {
		return
	}
	c.log.Warn("listing Services or EndpointSlices failed; the node stays not ready until both are listed", zap.Error(err))
	c.report(func(p *FirstSync) { p.ListError = err.Error() })
}
