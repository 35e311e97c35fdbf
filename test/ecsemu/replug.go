package ecsemu

import (
	"errors"
	"fmt"
	"sort"

	"go.uber.org/zap"
)

// ReplugInstance plugs every ENI attached to instance id into the SDN again, as the cloud
// does when the instance's VM is restarted or replaced under the same instance ID: the
// instance keeps its attached ENIs and their addresses (a stop or a host failure releases
// none of them), and the new guest sees them again, the primary ENI as eth0 configured by
// the image and every secondary ENI unconfigured. The caller has given the SDN the new
// guest first (NetnsSDN.SetInstanceNS). Whatever is left of the old plug is removed first,
// so replugging an instance whose guest still exists is harmless. It returns the ENIs
// plugged, primary first, then by device index, trunk members last.
func (e *Emulator) ReplugInstance(id string) ([]string, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return nil, errors.New("replug instance: the emulator is closed")
	}
	if _, ok := e.insts[id]; !ok {
		return nil, fmt.Errorf("replug instance %s: no such instance", id)
	}
	var plain, members []*eni
	for _, eid := range e.eniIDs {
		n := e.enis[eid]
		if !n.plugged || n.instanceID != id {
			continue
		}
		if n.trunk != "" {
			members = append(members, n)
		} else {
			plain = append(plain, n)
		}
	}
	// A member rides on its trunk's link: the trunk goes first.
	sort.SliceStable(plain, func(i, j int) bool { return plain[i].deviceIndex < plain[j].deviceIndex })
	var out []string
	for _, n := range append(plain, members...) {
		info := e.infoLocked(n)
		if err := e.sdn.DetachENI(info); err != nil {
			return out, fmt.Errorf("replug instance %s: remove what is left of ENI %s: %w", id, n.id, err)
		}
		if err := e.sdn.AttachENI(info); err != nil {
			n.plugged = false
			return out, fmt.Errorf("replug instance %s: plug ENI %s again: %w", id, n.id, err)
		}
		out = append(out, n.id)
	}
	e.log.Info("instance replugged", zap.String("instance", id), zap.Strings("enis", out))
	return out, nil
}
