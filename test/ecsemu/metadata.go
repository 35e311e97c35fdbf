package ecsemu

import (
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"time"
)

// MetadataHandler serves the instance-metadata service of one instance, as a guest would see
// it at http://100.100.100.200/latest/meta-data/. It is built from the same state as the API,
// so an ENI shows up under network/interfaces/macs/ once it is InUse.
func (e *Emulator) MetadataHandler(instanceID string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		path, ok := strings.CutPrefix(r.URL.Path, "/latest/meta-data/")
		if !ok && r.URL.Path != "/latest/meta-data" {
			http.NotFound(w, r)
			return
		}
		body, found := e.metadata(instanceID, strings.TrimSuffix(path, "/"))
		if !found {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write([]byte(body))
	})
}

// metadata answers one metadata path for an instance.
func (e *Emulator) metadata(instanceID, path string) (string, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	in, ok := e.insts[instanceID]
	if !ok {
		return "", false
	}
	primary := e.enis[in.primary]
	vs := e.vsws[in.cfg.VSwitchID]
	switch path {
	case "":
		return strings.Join([]string{"instance-id", "region-id", "zone-id", "vswitch-id", "vpc-id",
			"vpc-cidr-block", "vswitch-cidr-block", "mac", "private-ipv4", "network/", "instance/"}, "\n"), true
	case "instance-id":
		return in.cfg.ID, true
	case "instance/instance-type":
		return in.cfg.Type, true
	case "region-id":
		return e.cfg.RegionID, true
	case "zone-id":
		return in.cfg.Zone, true
	case "vswitch-id":
		return vs.cfg.ID, true
	case "vpc-id":
		return e.cfg.VPC.ID, true
	case "vpc-cidr-block":
		return e.cfg.VPC.CIDR, true
	case "vswitch-cidr-block":
		return vs.prefix.String(), true
	case "mac":
		return primary.mac.String(), true
	case "private-ipv4":
		return in.cfg.PrimaryIP, true
	case "network", "network/interfaces":
		return "interfaces/", true
	}
	rest, ok := strings.CutPrefix(path, "network/interfaces/macs")
	if !ok {
		return "", false
	}
	var attached []*eni
	for _, id := range e.eniIDs {
		n := e.enis[id]
		visible := n.typ == TypePrimary || e.now().Sub(n.attachedAt) >= time.Duration(e.delays.Metadata)
		if n.instanceID == instanceID && n.status == StatusInUse && visible && n.trunk == "" { // a member ENI is no device
			attached = append(attached, n)
		}
	}
	if rest == "" {
		var lines []string
		for _, n := range attached {
			lines = append(lines, n.mac.String()+"/")
		}
		return strings.Join(lines, "\n"), true
	}
	macStr, field, _ := strings.Cut(strings.TrimPrefix(rest, "/"), "/")
	mac, err := net.ParseMAC(macStr)
	if err != nil {
		return "", false
	}
	var n *eni
	for _, a := range attached {
		if a.mac.String() == mac.String() {
			n = a
		}
	}
	if n == nil {
		return "", false
	}
	switch field {
	case "":
		return strings.Join([]string{"network-interface-id", "primary-ip-address", "vswitch-id",
			"vswitch-cidr-block", "vpc-id", "vpc-cidr-block", "gateway", "netmask", "private-ipv4s"}, "\n"), true
	case "network-interface-id":
		return n.id, true
	case "primary-ip-address":
		return n.ips[0].String(), true
	case "vswitch-id":
		return n.vswitch.cfg.ID, true
	case "vswitch-cidr-block":
		return n.vswitch.prefix.String(), true
	case "vpc-id":
		return e.cfg.VPC.ID, true
	case "vpc-cidr-block":
		return e.cfg.VPC.CIDR, true
	case "gateway":
		return n.vswitch.gw.String(), true
	case "netmask":
		return net.IP(net.CIDRMask(n.vswitch.prefix.Bits(), 32)).String(), true
	case "private-ipv4s":
		ips := make([]string, 0, len(n.ips))
		for _, ip := range n.ips {
			ips = append(ips, ip.String())
		}
		b, _ := json.Marshal(ips)
		return string(b), true
	}
	return "", false
}
