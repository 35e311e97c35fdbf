package agent

import (
	"fmt"

	"go.uber.org/zap"

	"github.com/tern-net/tern/bandwidth"
)

// The bandwidth manager's place in the agent: the mode is decided before the datapath is
// loaded (the programs are compiled for it), the devices pod traffic leaves by get fq in
// EDT mode (netdev.go), and the component that reads the pods' annotations (agent/kube)
// hears of every endpoint attach and detach through the hooks below.

// chooseBandwidthMode applies cfg.BandwidthMode, probing the kernel for fq on "auto".
func (a *Agent) chooseBandwidthMode() (bandwidth.Mode, error) {
	mode, auto, err := bandwidth.ParseMode(a.cfg.BandwidthMode)
	if err != nil {
		return "", err
	}
	if !auto {
		a.log.Info("bandwidth manager mode set by configuration", zap.String("mode", string(mode)))
		return mode, nil
	}
	ok, err := bandwidth.ProbeFQ()
	if err != nil {
		return "", fmt.Errorf("bandwidth manager: %w (set bandwidthMode to edt or policer to skip the probe)", err)
	}
	mode = bandwidth.ModePolicer
	if ok {
		mode = bandwidth.ModeEDT
	}
	a.log.Info("bandwidth manager mode chosen by probing the kernel for the fq qdisc",
		zap.String("mode", string(mode)), zap.Bool("fq", ok))
	return mode, nil
}

// bandwidthMode is how pod egress limits are enforced on this node; empty until Run has
// loaded the datapath.
func (a *Agent) bandwidthMode() bandwidth.Mode {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.bwMode
}

// EndpointHooks hear of pods' host veths as the agent attaches and detaches them.
// Attached runs after the endpoint is recorded and before the programs go on the veth, so
// per-pod settings are in place for the first packet; Detached runs after the programs
// are removed. Both run with the attach lock held and must not block.
type EndpointHooks struct {
	Attached func(ifindex int)
	Detached func(ifindex int)
}

// OnEndpoint registers h; call it from a component's Start.
func (a *Agent) OnEndpoint(h EndpointHooks) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.endpointHooks = append(a.endpointHooks, h)
}

func (a *Agent) notifyEndpoint(ifindex int, attached bool) {
	a.mu.Lock()
	hooks := append([]EndpointHooks(nil), a.endpointHooks...)
	a.mu.Unlock()
	for _, h := range hooks {
		if attached && h.Attached != nil {
			h.Attached(ifindex)
		}
		if !attached && h.Detached != nil {
			h.Detached(ifindex)
		}
	}
}

// ensureFQLocked gives a device pod traffic leaves by the fq qdisc EDT needs. A failure is
// logged: the node's traffic still flows, only limited pods' egress goes unpaced there.
func (a *Agent) ensureFQLocked(ifindex int, what string) {
	if a.bandwidthMode() != bandwidth.ModeEDT {
		return
	}
	if err := bandwidth.EnsureFQ(ifindex); err != nil {
		a.log.Error("EDT bandwidth limits need fq on this interface", zap.String("interface", what), zap.Error(err))
	}
}
