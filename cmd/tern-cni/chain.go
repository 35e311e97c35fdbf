package main

import (
	"context"
	"fmt"
	"net"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/internal/nsutil"
)

// Chaining mode: tern-cni placed after another plugin in the conflist (ptp, bridge, a
// cloud's own plugin …), as Terway chains Cilium. The first plugin made the pod's interface
// and gave it its address; tern-cni finds the host side of that veth as the peer of the
// container interface, has the agent record the endpoint and attach the pod programs (and
// serve the hostPorts), and hands the previous result on unchanged. DEL detaches; the first
// plugin's own DEL (which libcni runs after tern-cni's) removes the veth and the address.

// chainedPod is what ADD learns from the previous result and the pod's namespace.
type chainedPod struct {
	ip       net.IP
	mac      string
	hostIdx  int
	hostName string
}

// cmdAddChained is ADD after another plugin.
func cmdAddChained(args *skel.CmdArgs, conf *NetConf, ref api.PodRef) error {
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "tern-cni (chained): convert the previous plugin's result", err.Error())
	}
	pod, err := findChainedPod(args, prev)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.timeout)
	defer cancel()
	client := api.NewClient(conf.Socket, conf.timeout)
	if _, err := client.Attach(ctx, api.AttachRequest{PodRef: ref, IfIndex: pod.hostIdx, IP: pod.ip.String(), MAC: pod.mac,
		Chained: true, PortMappings: conf.RuntimeConfig.PortMappings}); err != nil {
		return cniError(err, api.CodeDatapath)
	}
	return types.PrintResult(conf.PrevResult, conf.CNIVersion)
}

// findChainedPod reads the container interface's IPv4 address from the previous result and
// its veth peer (the host side) from the pod's namespace.
func findChainedPod(args *skel.CmdArgs, prev *current.Result) (chainedPod, error) {
	var pod chainedPod
	ifIdx := -1
	for i, itf := range prev.Interfaces {
		if itf.Name == args.IfName && itf.Sandbox != "" {
			ifIdx = i
			pod.mac = itf.Mac
		}
	}
	for _, ipc := range prev.IPs {
		if ipc.Address.IP.To4() == nil {
			continue
		}
		// An address without an interface index belongs to the only interface there is.
		if ipc.Interface == nil || *ipc.Interface == ifIdx {
			pod.ip = ipc.Address.IP.To4()
			break
		}
	}
	if pod.ip == nil {
		return pod, types.NewError(types.ErrInvalidNetworkConfig,
			fmt.Sprintf("tern-cni (chained): the previous plugin's result has no IPv4 address for %s; put tern-cni after a plugin that gives the pod its address", args.IfName),
			fmt.Sprint(prev.IPs))
	}
	podNS, err := netns.GetFromPath(args.Netns)
	if err != nil {
		return pod, types.NewError(types.ErrIOFailure, "open pod network namespace "+args.Netns, err.Error())
	}
	defer podNS.Close()
	var peer int
	err = nsutil.Do(podNS, func() error {
		l, err := netlink.LinkByName(args.IfName)
		if err != nil {
			return fmt.Errorf("pod interface %s: %w", args.IfName, err)
		}
		v, ok := l.(*netlink.Veth)
		if !ok {
			return fmt.Errorf("pod interface %s is a %s, not a veth: tern attaches to the host side of a veth pair", args.IfName, l.Type())
		}
		if pod.mac == "" {
			pod.mac = l.Attrs().HardwareAddr.String()
		}
		peer, err = netlink.VethPeerIndex(v)
		return err
	})
	if err != nil {
		return pod, types.NewError(api.CodeDatapath, "tern-cni (chained): find the host side of the pod's veth", err.Error())
	}
	hl, err := netlink.LinkByIndex(peer)
	if err != nil || hl.Type() != "veth" {
		return pod, types.NewError(api.CodeDatapath,
			fmt.Sprintf("tern-cni (chained): the peer of %s (ifindex %d) is not a veth in the node's namespace", args.IfName, peer), fmt.Sprint(err))
	}
	pod.hostIdx, pod.hostName = peer, hl.Attrs().Name
	return pod, nil
}

// cmdDelChained has the agent detach the sandbox it recorded at ADD (it knows the veth), and
// forget its hostPorts. Repeating it is harmless.
func cmdDelChained(ctx context.Context, client *api.Client, ref api.PodRef) error {
	if err := client.Detach(ctx, api.AttachRequest{PodRef: api.PodRef{Namespace: ref.Namespace, Name: ref.Name,
		ContainerID: ref.ContainerID, IfName: ref.IfName}}); err != nil {
		return cniError(err, api.CodeDatapath)
	}
	return nil
}

// cmdCheckChained checks that the host side of the pod's veth is still there with the
// programs' endpoint recorded; the first plugin checks its own part.
func cmdCheckChained(args *skel.CmdArgs, conf *NetConf) error {
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "tern-cni (chained): convert the previous result", err.Error())
	}
	pod, err := findChainedPod(args, prev)
	if err != nil {
		return err
	}
	hl, err := netlink.LinkByIndex(pod.hostIdx)
	if err != nil || hl.Attrs().OperState != netlink.OperUp {
		return types.NewError(api.CodeDatapath, "host veth "+pod.hostName+" is missing or down", fmt.Sprint(err))
	}
	return nil
}

// chained tells a chained sandbox's DEL or CHECK from one of tern's own. Both get the whole
// list's cached result as prevResult, so its presence alone says nothing (ADD is different:
// only a plugin after the first gets one); a result without the host veth tern names for
// this sandbox was made by another plugin.
func chained(conf *NetConf, args *skel.CmdArgs) bool {
	if conf.PrevResult == nil {
		return false
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return false
	}
	own := api.HostVethName(args.ContainerID, args.IfName)
	for _, itf := range prev.Interfaces {
		if itf.Name == own && itf.Sandbox == "" {
			return false
		}
	}
	return true
}
