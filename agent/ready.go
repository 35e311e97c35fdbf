package agent

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/tern-net/tern/agent/api"
)

// waitReadyForPods waits until every readiness component is ready (the datapath components'
// first full sync in the maps), logging what it waits for, and then installs the CNI
// configuration. On a fresh node the runtime finds no configuration until then, so no pod
// can start networking before the Services it will talk to are programmed. It returns nil
// when ctx ends first (the agent is stopping).
func (a *Agent) waitReadyForPods(ctx context.Context) error {
	start := time.Now()
	if st := a.readiness.Status(); !st.Ready {
		a.log.Info("waiting for the datapath components' first sync before installing the CNI configuration",
			zap.String("waiting", st.Summary()))
	}
	if err := a.readiness.Wait(ctx); err != nil {
		if ctx.Err() != nil {
			a.log.Info("stopped before the node was ready", zap.String("waiting", a.readiness.Status().Summary()))
			return nil
		}
		return err
	}
	a.log.Info("datapath components synced", zap.Duration("took", time.Since(start)))
	if a.cfg.CNIConfDir != "" {
		path, err := a.installConflist()
		if err != nil {
			return err
		}
		a.log.Info("installed CNI configuration", zap.String("path", path))
	}
	return nil
}

// cniStatus answers CNI STATUS: pods may be added once the pool serves and every readiness
// component is ready; otherwise the message names what is not ready and why.
func (a *Agent) cniStatus() api.Status {
	if a.cfg.IPAM.Off() {
		if !a.ready.Load() {
			return api.Status{Ready: false, Message: "tern-agent is starting: the datapath is not loaded yet"}
		}
	} else if _, e := a.poolOrRetry(); e != nil {
		return api.Status{Ready: false, Message: e.Msg}
	}
	if st := a.readiness.Status(); !st.Ready {
		return api.Status{Ready: false, Message: "tern-agent is not ready: " + st.Summary()}
	}
	return api.Status{Ready: true}
}
