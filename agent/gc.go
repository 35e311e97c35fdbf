package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"go.uber.org/zap"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/datapath"
	"github.com/tern-net/tern/ipam"
)

// GCResult says what GC cleaned.
type GCResult struct {
	Released    []ipam.PodKey
	DeletedENIs []string
	AdoptedENIs []string
}

// GC releases every allocation whose sandbox keep rejects, after removing what the CNI built
// for it on the node (host veth, policy rules), then lets the pool clean the cloud side.
//
// keep is the seam for live-sandbox sources: CNI GC passes the runtime's valid attachments
// (by container ID); a Kubernetes pod informer can later pass the pods bound to this node (by
// namespace/name). Node-side leftovers go first so that an address is never handed to a new
// pod while the old pod's rules still point at it.
func (a *Agent) GC(ctx context.Context, keep func(ipam.PodKey) bool) (GCResult, error) {
	var res GCResult
	pool := a.startedPool()
	if pool == nil {
		return res, errors.New("agent GC: the IP pool is not started")
	}
	var errs []error
	var recovered recoveredView
	for key, al := range pool.Allocations() {
		// A hold (a fixed address kept for a pod without a sandbox) has no veth; the
		// fixed-IP manager's hold pass decides when it goes.
		if key.IsHold() {
			continue
		}
		if key.IsRecovered() {
			// A recovered allocation (a start on an empty store) names no sandbox the runtime
			// knows, so keep cannot judge it: it stays while a live host veth carries its
			// address or the apiserver still shows its pod with it (agent/livepods.go).
			if recovered.holds(ctx, a, key, al.IP) {
				continue
			}
		} else if keep(key) {
			continue
		}
		// The host veth is found by its route to the address, so a sandbox added with any
		// interface name (not only eth0) loses it; the eth0 name is the fallback.
		hostIf, err := datapath.HostVethOf(al.IP)
		if err != nil {
			errs = append(errs, fmt.Errorf("GC of %s: %w", key, err))
			continue
		}
		if hostIf == "" {
			hostIf = api.HostVethName(key.ContainerID, "eth0")
		}
		derr, err := datapath.TeardownPod(datapath.PodTeardown{HostIfName: hostIf, IP: al.IP, Detach: a.detach})
		if derr != nil {
			a.log.Warn("GC: detach pod programs", zap.String("link", hostIf), zap.Error(derr))
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("GC of %s: %w", key, err))
			continue
		}
		if err := a.untagMemberPod(al); err != nil {
			errs = append(errs, fmt.Errorf("GC of %s: %w", key, err))
			continue
		}
		if err := a.forgetEndpointsAt(al.IP); err != nil {
			errs = append(errs, fmt.Errorf("GC of %s: %w", key, err))
			continue
		}
		if err := pool.Release(ctx, key); err != nil {
			errs = append(errs, fmt.Errorf("GC of %s: %w", key, err))
			continue
		}
		// Its hostPorts go too, also when the veth was already gone (no detach ran).
		if err := a.dropSandboxes(func(r sandboxRecord) bool { return r.ContainerID == key.ContainerID }); err != nil {
			errs = append(errs, fmt.Errorf("GC of %s: remove hostPorts: %w", key, err))
		}
		res.Released = append(res.Released, key)
		a.log.Info("GC released the address of a sandbox that is gone", zap.Stringer("pod", key), zap.Stringer("ip", al.IP))
	}
	// Every allocation left is live, so the pool's own pass only cleans ENIs and trims.
	live := map[string]bool{}
	for key := range pool.Allocations() {
		live[key.Namespace+"/"+key.Name] = true
	}
	pres, err := pool.GC(ctx, func() map[string]bool { return live })
	if err != nil {
		errs = append(errs, err)
	}
	res.DeletedENIs, res.AdoptedENIs = pres.DeletedENIs, pres.AdoptedENIs
	if dp := a.loadedDatapath(); dp != nil {
		a.attachMu.Lock()
		a.sweepNetdevPinsLocked(dp)
		a.attachMu.Unlock()
	}
	a.m.gcReleased.Add(float64(len(res.Released)))
	return res, errors.Join(errs...)
}

// forgetEndpointsAt removes every endpoint record that still carries ip, before ip goes back
// to the pool. Teardown finds a pod's record through its host veth; when the pod's network
// namespace was destroyed without a CNI DEL (a runtime that died), the veth pair went with
// it, so neither DEL nor GC can name the interface and the record (and the address's
// ipcache entry as a local pod) would outlive the address, until the next agent start
// prunes it — by then possibly deleting the ipcache entry of the pod that got the address
// next.
func (a *Agent) forgetEndpointsAt(ip netip.Addr) error {
	dp, reg := a.loadedDatapath(), a.endpointRegistry()
	if dp == nil || reg == nil {
		return nil
	}
	a.attachMu.Lock()
	defer a.attachMu.Unlock()
	var errs []error
	for _, e := range reg.List() {
		if e.Addr != ip {
			continue
		}
		if err := errors.Join(dp.DetachPod(e.IfIndex), reg.Delete(e.IfIndex)); err != nil {
			errs = append(errs, fmt.Errorf("forget endpoint %s on ifindex %d: %w", ip, e.IfIndex, err))
			continue
		}
		a.notifyEndpoint(e.IfIndex, false)
		a.m.vanishedEndpoints.Inc()
		a.log.Info("forgot the endpoint of a pod whose interface vanished without a detach",
			zap.Stringer("ip", ip), zap.Int("ifindex", e.IfIndex), zap.String("pod", e.Pod))
	}
	return errors.Join(errs...)
}

// detach removes the pod programs and its endpoint record from a host veth, if the
// datapath is loaded.
func (a *Agent) detach(ifindex int) error {
	dp := a.loadedDatapath()
	if dp == nil {
		return nil
	}
	// Its hostPorts go first (also when GC, not DEL, finds the sandbox gone).
	herr := a.dropSandboxes(func(r sandboxRecord) bool { return r.IfIndex == ifindex })
	a.attachMu.Lock()
	defer a.attachMu.Unlock()
	err := errors.Join(herr, dp.DetachPod(ifindex), a.endpointRegistry().Delete(ifindex))
	a.notifyEndpoint(ifindex, false)
	return err
}
