package agent

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/endpoint"
	"github.com/tern-net/tern/loader"
)

// openEndpoints builds the endpoint registry and ipcache reconcilers over the loaded maps and
// forgets the pods whose host veth went away while no agent was running.
func openEndpoints(dp *loader.Datapath, log *zap.Logger) (*endpoint.Registry, error) {
	cache, err := endpoint.NewIPCache(dp.Maps())
	if err != nil {
		return nil, err
	}
	reg, err := endpoint.NewRegistry(dp.Maps(), cache)
	if err != nil {
		return nil, err
	}
	n, err := reg.Prune(hostVethAlive)
	if err != nil {
		return nil, fmt.Errorf("prune endpoints of deleted pods: %w", err)
	}
	if n > 0 {
		log.Info("forgot endpoints whose host veth is gone", zap.Int("count", n))
	}
	// The pods that stayed keep their ipcache entries; an entry an older agent wrote
	// lacks the flags added since (an exclusive-ENI pod's), which the datapath needs now.
	if n, err = reg.RestoreIPCache(); err != nil {
		return nil, fmt.Errorf("restore the ipcache entries of local pods: %w", err)
	}
	if n > 0 {
		log.Info("rewrote the ipcache entries of local pods", zap.Int("count", n))
	}
	return reg, nil
}

func hostVethAlive(ifindex int) bool {
	l, err := netlink.LinkByIndex(ifindex)
	return err == nil && l.Type() == "veth"
}

// endpointOf turns an attach request into the endpoint to record. The plugin sends the
// pod's address and MAC; an older plugin that does not is served without a record.
func endpointOf(req api.AttachRequest) (endpoint.Endpoint, bool, error) {
	if req.IP == "" {
		return endpoint.Endpoint{}, false, nil
	}
	addr, err := netip.ParseAddr(req.IP)
	if err != nil || !addr.Is4() {
		return endpoint.Endpoint{}, false, fmt.Errorf("ip %q is not an IPv4 address", req.IP)
	}
	e := endpoint.Endpoint{IfIndex: req.IfIndex, Addr: addr}
	if req.Namespace != "" && req.Name != "" {
		e.Pod = req.Namespace + "/" + req.Name
	}
	if req.MAC != "" {
		if e.MAC, err = net.ParseMAC(req.MAC); err != nil || len(e.MAC) != 6 {
			return e, false, fmt.Errorf("mac %q is not an Ethernet address", req.MAC)
		}
	}
	return e, true, nil
}
