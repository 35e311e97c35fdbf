package agent

import (
	"errors"
	"fmt"
	"path/filepath"

	"go.uber.org/zap"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/datapath"
	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/loader"
)

// ENI trunking on the node (docs/trunking.md): a member pod is wired by the CNI like an ENIIP
// pod of the trunk ENI (the allocation's ENI is the trunk); the agent, which owns the BPF
// objects, puts the VLAN programs first on the trunk ENI's link and the pod's VLAN into their
// maps when the CNI attaches the pod, and takes the VLAN out when the pod is released.

// loadTrunk loads (or reopens, after a restart) the trunk programs under the pin root and
// picks how they attach: tcx, or clsact on a kernel without it (and with forceClsact), where
// they take a filter priority before the netdev programs' (loader.TrunkClsactPriority).
func (a *Agent) loadTrunk() (*datapath.Trunk, error) {
	t, err := datapath.LoadTrunk(filepath.Join(a.cfg.PinRoot, "trunk"))
	if err != nil {
		return nil, fmt.Errorf("ENI trunking (eni_conf enable_eni_trunking): %w", err)
	}
	if err := t.ProbeTCX(); err != nil || a.cfg.ForceClsact {
		t.SetAttachMode(loader.AttachClsact)
		a.log.Info("trunk programs attach with clsact", zap.Bool("forceClsact", a.cfg.ForceClsact), zap.NamedError("tcx", err))
	}
	return t, nil
}

func (a *Agent) trunkDatapath() *datapath.Trunk {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.kinds.trunk
}

// tagMemberPod makes a member pod's traffic carry its VLAN on the trunk link (and attaches the
// netdev programs there, as on any ENI with pods). Called with attachMu held.
func (a *Agent) tagMemberPod(dp *loader.Datapath, key ipam.PodKey, al ipam.Allocation) error {
	t := a.trunkDatapath()
	if t == nil {
		return errors.New("the trunk programs are not loaded (the member kind is off)")
	}
	idx, err := linkByMAC(al.ENI.MAC)
	if err != nil {
		return fmt.Errorf("trunk ENI %s of pod %s: %w", al.ENI.ID, key, err)
	}
	if err := t.Attach(idx); err != nil {
		return err
	}
	if err := t.AddPod(al.IP, idx, al.VLAN); err != nil {
		return err
	}
	if !dp.NetdevAttached(idx) {
		a.attachNetdevLocked(dp, idx, "trunk ENI "+al.ENI.ID)
	}
	a.log.Debug("member pod tagged", zap.Stringer("pod", key), zap.Stringer("ip", al.IP), zap.Int("vlan", al.VLAN), zap.Int("trunkIfindex", idx))
	return nil
}

// untagMemberPod removes a member pod's VLAN entries before its member ENI goes (another pod
// may get the VLAN id next).
func (a *Agent) untagMemberPod(al ipam.Allocation) error {
	if al.Kind != ipam.KindMember {
		return nil
	}
	t := a.trunkDatapath()
	if t == nil {
		return nil
	}
	idx, err := linkByMAC(al.ENI.MAC)
	if err != nil {
		idx = 0 // the link is gone: the address entry still goes
	}
	return t.DelPod(al.IP, idx, al.VLAN)
}

// tagIfMember tags the pod of an attach when it holds a member ENI (a CNI attach names the
// pod; a chained attach or an ENIIP pod has nothing to tag).
func (a *Agent) tagIfMember(dp *loader.Datapath, ref api.PodRef) *api.Error {
	pool := a.startedPool()
	if pool == nil || ref.Namespace == "" || ref.Name == "" {
		return nil
	}
	key := ipam.PodKey{Namespace: ref.Namespace, Name: ref.Name, ContainerID: ref.ContainerID}
	al, ok := pool.Allocations()[key]
	if !ok || al.Kind != ipam.KindMember {
		return nil
	}
	if err := a.tagMemberPod(dp, key, al); err != nil {
		return &api.Error{Code: api.CodeDatapath, Msg: fmt.Sprintf("tag member pod %s with VLAN %d on its trunk ENI", al.IP, al.VLAN), Details: err.Error()}
	}
	return nil
}
