//go:build linux

package ecsemu

import "github.com/vishvananda/netns"

// SetInstanceNS makes ns the guest of instance id from now on: the instance's VM was
// replaced (or rebooted into a fresh network namespace), so its old namespace and every link
// in it are gone — the kernel deleted each ENI's veth pair with the namespace, the routes of
// the VPC-side ends with them. Emulator.ReplugInstance then plugs the instance's ENIs into
// ns. The caller owns ns and keeps it open until Close, as with NewNetnsSDN.
func (s *NetnsSDN) SetInstanceNS(id string, ns netns.NsHandle) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nodes[id] = ns
}
