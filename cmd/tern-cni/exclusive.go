package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netns"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/datapath"
)

// addExclusive wires a pod that holds a whole ENI (allocation kind "eni"): the ENI moves into
// the pod as args.IfName with its primary address, and a veth (pod end "veth1") carries the
// Service CIDR and the node's address to the host, where the pod programs run on its host
// end. On failure everything is undone and the ENI released (the agent deletes it).
func addExclusive(ctx context.Context, args *skel.CmdArgs, conf *NetConf, ref api.PodRef, client *api.Client, al api.Allocation) (err error) {
	ip, err := netip.ParseAddr(al.IP)
	if err != nil {
		return types.NewError(api.CodeInternal, "agent returned a bad pod IP", al.IP)
	}
	mac, err := net.ParseMAC(al.ENI.MAC)
	if err != nil {
		return types.NewError(api.CodeInternal, "agent returned a bad ENI MAC", al.ENI.MAC)
	}
	gw, gerr := netip.ParseAddr(al.ENI.Gateway)
	cidr, cerr := netip.ParsePrefix(al.ENI.VSwitchCIDR)
	if gerr != nil || cerr != nil {
		return types.NewError(api.CodeInternal, "agent returned a bad gateway or vSwitch CIDR", al.ENI.Gateway+" "+al.ENI.VSwitchCIDR)
	}
	var via []netip.Prefix
	for _, s := range al.ViaVeth {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return types.NewError(api.CodeInternal, "agent returned a bad veth route", s)
		}
		via = append(via, p)
	}
	podNS, err := netns.GetFromPath(args.Netns)
	if err != nil {
		return types.NewError(types.ErrIOFailure, fmt.Sprintf("open pod network namespace %s", args.Netns), err.Error())
	}
	defer podNS.Close()
	hostIf := api.HostVethName(args.ContainerID, args.IfName)
	defer func() {
		if err == nil {
			return
		}
		if nodeNS, nerr := netns.Get(); nerr == nil {
			_ = datapath.ReturnExclusiveENI(podNS, mac, nodeNS)
			nodeNS.Close()
		}
		_ = datapath.DeletePodRules(ip)
		_ = datapath.DeletePodLink(hostIf)
		rctx, rcancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer rcancel()
		_, _ = client.Release(rctx, ref)
	}()
	if err := datapath.DeletePodLink(hostIf); err != nil {
		return types.NewError(api.CodeDatapath, "remove stale host veth "+hostIf, err.Error())
	}
	pl, err := datapath.SetupExclusiveENI(datapath.ExclusiveENI{MAC: mac, IP: ip, Prefix: cidr, Gateway: gw, PodNS: podNS,
		PodIfName: args.IfName, HostIfName: hostIf, ViaVeth: via, MTU: conf.MTU, LinkTimeout: conf.eniTimeout})
	if err != nil {
		return types.NewError(api.CodeDatapath, fmt.Sprintf("move ENI %s (MAC %s) into pod %s/%s", al.ENI.ID, al.ENI.MAC, ref.Namespace, ref.Name), err.Error())
	}
	if _, err := client.Attach(ctx, api.AttachRequest{PodRef: ref, IfIndex: pl.HostIndex, IP: ip.String(), MAC: pl.PodMAC.String(),
		PortMappings: conf.RuntimeConfig.PortMappings}); err != nil {
		return cniError(err, api.CodeDatapath)
	}
	eniIdx := 1
	result := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: hostIf, Mac: pl.HostMAC.String()},
			{Name: args.IfName, Mac: mac.String(), Sandbox: args.Netns},
			{Name: datapath.ExclusiveVethName, Mac: pl.PodMAC.String(), Sandbox: args.Netns},
		},
		IPs: []*current.IPConfig{{
			Interface: &eniIdx,
			Address:   net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(cidr.Bits(), 32)},
			Gateway:   gw.AsSlice(),
		}},
		Routes: []*types.Route{{Dst: net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, GW: gw.AsSlice()}},
	}
	for _, p := range via {
		result.Routes = append(result.Routes, &types.Route{Dst: net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}, GW: datapath.PodGateway.AsSlice()})
	}
	return types.PrintResult(result, conf.CNIVersion)
}

// returnExclusive moves an exclusive pod's ENI back to the node before the agent detaches
// it. A missing pod namespace is fine (the runtime may have removed it): the detach removes
// the device wherever it is.
func returnExclusive(args *skel.CmdArgs, al *api.Allocation) {
	if al == nil || al.Kind != api.KindENI || args.Netns == "" {
		return
	}
	mac, err := net.ParseMAC(al.ENI.MAC)
	if err != nil {
		return
	}
	podNS, err := netns.GetFromPath(args.Netns)
	if err != nil {
		return
	}
	defer podNS.Close()
	nodeNS, err := netns.Get()
	if err != nil {
		return
	}
	defer nodeNS.Close()
	_ = datapath.ReturnExclusiveENI(podNS, mac, nodeNS)
}
