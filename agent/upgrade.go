package agent

import (
	"go.uber.org/zap"

	"github.com/tern-net/tern/loader"
)

// takeOverPods puts this agent's programs on every pod a previous agent attached, and then
// completes an upgrade of the pinned maps if Load found one (see loader/upgrade.go). It runs
// after the components started, because the service reconciler rebuilds the membership
// index the new programs read from the slots it finds; attached earlier, established UDP
// flows would be load-balanced again. A failure is logged, never fatal: a pod that still
// runs the old programs keeps forwarding with its old maps, and the next start tries again.
func (a *Agent) takeOverPods(dp *loader.Datapath) {
	a.attachMu.Lock()
	defer a.attachMu.Unlock()
	ifs, err := dp.ReattachPods()
	if err != nil {
		a.log.Error("some pods still run the previous datapath programs; the old maps stay pinned until a start re-attaches them all",
			zap.Int("reattached", len(ifs)), zap.Error(err))
		return
	}
	if err := dp.FinishUpgrade(); err != nil {
		a.log.Error("could not remove the previous datapath layout's pins; the next start removes them", zap.Error(err))
	}
}
