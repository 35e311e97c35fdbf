// Command tern-cni is tern's CNI plugin (spec 1.1.0: ADD, DEL, CHECK, STATUS, GC).
//
// The runtime runs it in the node's network namespace. It asks tern-agent for an address
// over the agent's unix socket, builds the pod's veth and the node's policy routing with
// package datapath, and asks the agent to attach the pod programs to the host veth (the
// agent owns the loaded BPF objects, so the plugin never loads BPF itself). See docs/cni.md.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/datapath"
	"github.com/tern-net/tern/internal/nsutil"
)

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck, Status: cmdStatus, GC: cmdGC},
		version.PluginSupports("0.4.0", "1.0.0", "1.1.0"), "tern-cni: pods on ENI secondary IPs, eBPF datapath")
}

// NetConf is tern's network configuration (one entry of the conflist's plugins).
type NetConf struct {
	types.NetConf
	// Socket is the agent's unix socket (default /var/run/tern/agent.sock).
	Socket string `json:"socket,omitempty"`
	// MTU of the pod veth; 0 keeps the kernel default (1500).
	MTU int `json:"mtu,omitempty"`
	// Timeout bounds each call to the agent (default 30s), ENILinkTimeout the wait for an
	// attached ENI's link to appear in the node (default 10s). Go durations.
	Timeout        string `json:"timeout,omitempty"`
	ENILinkTimeout string `json:"eniLinkTimeout,omitempty"`

	// RuntimeConfig carries the capabilities the conflist declares and the runtime fills:
	// portMappings (the pod's hostPorts).
	RuntimeConfig struct {
		PortMappings []api.PortMapping `json:"portMappings,omitempty"`
		// PodAnnotations may ask for an exclusive ENI (k8s.aliyun.com/eni) and place it.
		PodAnnotations map[string]string `json:"io.kubernetes.cri.pod-annotations,omitempty"`
	} `json:"runtimeConfig,omitempty"`

	// ValidAttachments is set by GC. A pointer, so that a missing key is told from an empty
	// list: only the latter means "no attachment is valid".
	ValidAttachments *[]types.GCAttachment `json:"cni.dev/valid-attachments,omitempty"`

	timeout, eniTimeout time.Duration
}

// K8sArgs are the CNI_ARGS the kubelet's runtime passes.
type K8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive // CNI_ARGS names
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive
	K8S_POD_UID                types.UnmarshallableString //nolint:revive
}

func parseConf(b []byte) (*NetConf, error) {
	c := &NetConf{Socket: api.DefaultSocketPath}
	if err := json.Unmarshal(b, c); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "parse tern-cni network config", err.Error())
	}
	if c.Socket == "" {
		c.Socket = api.DefaultSocketPath
	}
	// A previous plugin's result makes this a chained call (chain.go).
	if err := version.ParsePrevResult(&c.NetConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "parse prevResult of tern-cni's network config", err.Error())
	}
	var err error
	if c.timeout, err = durationOr(c.Timeout, 30*time.Second); err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "tern-cni config: timeout", err.Error())
	}
	if c.eniTimeout, err = durationOr(c.ENILinkTimeout, 10*time.Second); err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "tern-cni config: eniLinkTimeout", err.Error())
	}
	return c, nil
}

// durationOr parses a positive Go duration, def when s is empty. Zero or negative would make
// every call to the agent fail at once with a deadline error that does not name the config.
func durationOr(s string, def time.Duration) (time.Duration, error) {
	if s == "" {
		return def, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, err
	}
	if d <= 0 {
		return 0, fmt.Errorf("%q is not a positive duration (want e.g. %q, or leave it out for %v)", s, "30s", def)
	}
	return d, nil
}

func podRef(args *skel.CmdArgs) (api.PodRef, error) {
	var k K8sArgs
	if err := types.LoadArgs(args.Args, &k); err != nil {
		return api.PodRef{}, types.NewError(types.ErrInvalidEnvironmentVariables, "parse CNI_ARGS", err.Error())
	}
	ref := api.PodRef{Namespace: string(k.K8S_POD_NAMESPACE), Name: string(k.K8S_POD_NAME), ContainerID: args.ContainerID, IfName: args.IfName}
	if ref.Namespace == "" || ref.Name == "" {
		return ref, types.NewError(types.ErrInvalidEnvironmentVariables,
			"CNI_ARGS lack K8S_POD_NAMESPACE or K8S_POD_NAME: tern-cni serves Kubernetes pods only", bounded(args.Args))
	}
	if err := api.ValidatePodRef(ref); err != nil {
		return ref, types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_ARGS: "+err.Error(), "")
	}
	return ref, nil
}

// bounded cuts s to a length fit for an error message.
func bounded(s string) string {
	const max = 200
	if len(s) > max {
		return fmt.Sprintf("%s… (%d bytes)", s[:max], len(s))
	}
	return s
}

// cniError turns an agent or local error into the CNI error the runtime reports.
func cniError(err error, code uint) error {
	e := api.AsError(err, code)
	return types.NewError(e.Code, e.Msg, e.Details)
}

func cmdAdd(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	ref, err := podRef(args)
	if err != nil {
		return err
	}
	if err := checkNetNS(args.Netns); err != nil {
		return err
	}
	if conf.PrevResult != nil {
		return cmdAddChained(args, conf, ref)
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.timeout)
	defer cancel()
	client := api.NewClient(conf.Socket, conf.timeout)
	var k K8sArgs
	_ = types.LoadArgs(args.Args, &k)
	al, err := client.Allocate(ctx, api.AllocateRequest{PodRef: ref, UID: string(k.K8S_POD_UID), NetNS: args.Netns,
		Annotations: conf.RuntimeConfig.PodAnnotations})
	if err != nil {
		return cniError(err, api.CodeInternal)
	}
	if al.Kind == api.KindENI {
		return addExclusive(ctx, args, conf, ref, client, al)
	}
	podIP, eni, err := parseAllocation(al)
	if err != nil {
		return cniError(err, api.CodeInternal)
	}
	hostIf := api.HostVethName(args.ContainerID, args.IfName)

	done := false
	defer func() {
		if done {
			return
		}
		// Undo in reverse so the address goes back to the pool only once nothing on the
		// node points at it any more.
		_ = datapath.DeletePodRules(podIP)
		_ = datapath.DeletePodLink(hostIf)
		rctx, rcancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer rcancel()
		_, _ = client.Release(rctx, ref)
	}()

	link, err := datapath.EnsureENI(eni, conf.eniTimeout)
	if err != nil {
		return types.NewError(api.CodeDatapath, fmt.Sprintf("set up ENI %s (MAC %s) for pod %s/%s", al.ENI.ID, al.ENI.MAC, ref.Namespace, ref.Name), err.Error())
	}
	podNS, err := netns.GetFromPath(args.Netns)
	if err != nil {
		return types.NewError(types.ErrIOFailure, fmt.Sprintf("open pod network namespace %s", args.Netns), err.Error())
	}
	defer podNS.Close()
	// A retried ADD of the same sandbox finds its own earlier veth: start over.
	if err := datapath.DeletePodLink(hostIf); err != nil {
		return types.NewError(api.CodeDatapath, "remove stale host veth "+hostIf, err.Error())
	}
	pl, err := datapath.SetupPodLink(datapath.PodLink{HostIfName: hostIf, PodIfName: args.IfName, PodNS: podNS, PodIP: podIP, MTU: conf.MTU})
	if err != nil {
		return types.NewError(api.CodeDatapath, fmt.Sprintf("set up pod veth %s for %s", hostIf, podIP), err.Error())
	}
	if err := datapath.SetupPodRules(podIP, link.Table); err != nil {
		return types.NewError(api.CodeDatapath, fmt.Sprintf("policy routing for %s via ENI %s", podIP, link.Name), err.Error())
	}
	if _, err := client.Attach(ctx, api.AttachRequest{PodRef: ref, IfIndex: pl.HostIndex, IP: podIP.String(), MAC: pl.PodMAC.String(),
		PortMappings: conf.RuntimeConfig.PortMappings}); err != nil {
		return cniError(err, api.CodeDatapath)
	}

	idx := 1
	result := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: hostIf, Mac: pl.HostMAC.String()},
			{Name: args.IfName, Mac: pl.PodMAC.String(), Sandbox: args.Netns},
		},
		IPs: []*current.IPConfig{{
			Interface: &idx,
			Address:   net.IPNet{IP: podIP.AsSlice(), Mask: net.CIDRMask(32, 32)},
			Gateway:   datapath.PodGateway.AsSlice(),
		}},
		Routes: []*types.Route{{Dst: net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, GW: datapath.PodGateway.AsSlice()}},
	}
	done = true
	return types.PrintResult(result, conf.CNIVersion)
}

func parseAllocation(al api.Allocation) (netip.Addr, datapath.ENI, error) {
	ip, err := netip.ParseAddr(al.IP)
	if err != nil {
		return ip, datapath.ENI{}, fmt.Errorf("agent returned a bad pod IP %q: %w", al.IP, err)
	}
	mac, err := net.ParseMAC(al.ENI.MAC)
	if err != nil {
		return ip, datapath.ENI{}, fmt.Errorf("agent returned a bad MAC %q for ENI %s: %w", al.ENI.MAC, al.ENI.ID, err)
	}
	gw, err := netip.ParseAddr(al.ENI.Gateway)
	if err != nil {
		return ip, datapath.ENI{}, fmt.Errorf("agent returned a bad gateway %q for ENI %s: %w", al.ENI.Gateway, al.ENI.ID, err)
	}
	primary, _ := netip.ParseAddr(al.ENI.PrimaryIP)
	return ip, datapath.ENI{MAC: mac, PrimaryIP: primary, Gateway: gw, NodePrimary: al.ENI.NodePrimary}, nil
}

// cmdDel tears the sandbox's networking down. It needs neither the pod's namespace (the host
// veth's deletion removes the pair) nor a cached result, and repeating it is harmless. Without
// usable K8S_POD_* arguments it still works: the agent finds the sandbox by container ID, so
// a DEL can always succeed.
func cmdDel(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.timeout)
	defer cancel()
	client := api.NewClient(conf.Socket, conf.timeout)
	ref, err := podRef(args)
	if err != nil {
		ref = api.PodRef{ContainerID: args.ContainerID, IfName: args.IfName}
	}
	if chained(conf, args) {
		return cmdDelChained(ctx, client, ref)
	}
	// The address's rules are removed only while this sandbox still owns it: once released
	// (by GC, say) it may already belong to another pod whose rules must stay.
	lk, lerr := client.Lookup(ctx, ref)
	if lerr != nil && api.AsError(lerr, 0).Code == api.CodeIPAMOff {
		// Chained, but the runtime had no cached result to pass as prevResult.
		return cmdDelChained(ctx, client, ref)
	}
	if lerr == nil && !lk.Found && ref.Name != "" {
		// The container ID may hold another pod's address (an ADD under a second pod name was
		// refused): its veth and rules are that pod's, so this DEL has nothing to remove.
		if other, err := client.Lookup(ctx, api.PodRef{ContainerID: ref.ContainerID}); err == nil && other.Found && other.Pod != nil {
			return nil
		}
	}
	var ip netip.Addr
	if lerr == nil && lk.Found {
		ip, _ = netip.ParseAddr(lk.Allocation.IP)
	}
	hostIf := api.HostVethName(args.ContainerID, args.IfName)
	if lerr == nil && lk.Found {
		returnExclusive(args, lk.Allocation)
	}
	// The veth goes even when the agent is unreachable; the rules then wait for GC.
	_, terr := datapath.TeardownPod(datapath.PodTeardown{HostIfName: hostIf, IP: ip,
		Detach: func(ifindex int) error {
			return client.Detach(ctx, api.AttachRequest{PodRef: api.PodRef{ContainerID: args.ContainerID, IfName: args.IfName}, IfIndex: ifindex})
		}})
	if terr != nil {
		return types.NewError(api.CodeDatapath, "tear down host veth "+hostIf, terr.Error())
	}
	if lerr != nil {
		return cniError(lerr, api.CodeInternal)
	}
	if !lk.Found {
		// Not an address of tern's: a chained sandbox whose DEL came without a result.
		return cmdDelChained(ctx, client, ref)
	}
	if _, err := client.Release(ctx, ref); err != nil {
		return cniError(err, api.CodeInternal)
	}
	return nil
}

// cmdCheck verifies that the agent still holds the sandbox's address and that the node and
// pod sides are wired as ADD left them.
func cmdCheck(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	ref, err := podRef(args)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.timeout)
	defer cancel()
	if chained(conf, args) {
		return cmdCheckChained(args, conf)
	}
	lk, err := api.NewClient(conf.Socket, conf.timeout).Lookup(ctx, ref)
	if err != nil {
		return cniError(err, api.CodeInternal)
	}
	if !lk.Found {
		return types.NewError(api.CodeUnknownPod, fmt.Sprintf("tern-agent holds no address for sandbox %s of %s/%s", ref.ContainerID, ref.Namespace, ref.Name), "")
	}
	ip, err := netip.ParseAddr(lk.Allocation.IP)
	if err != nil {
		return types.NewError(api.CodeInternal, "agent returned a bad IP", lk.Allocation.IP)
	}
	if conf.PrevResult != nil {
		prev, err := current.NewResultFromResult(conf.PrevResult)
		if err == nil && (len(prev.IPs) == 0 || !prev.IPs[0].Address.IP.Equal(ip.AsSlice())) {
			return types.NewError(api.CodeDatapath, fmt.Sprintf("the agent holds %s for this sandbox but ADD returned %v", ip, prev.IPs), "")
		}
	}
	hostIf := api.HostVethName(args.ContainerID, args.IfName)
	hl, err := netlink.LinkByName(hostIf)
	if err != nil || hl.Attrs().OperState != netlink.OperUp {
		return types.NewError(api.CodeDatapath, "host veth "+hostIf+" is missing or down", fmt.Sprint(err))
	}
	rules, err := datapath.PodRulesOf(ip)
	exclusive := lk.Allocation.Kind == api.KindENI // no "from" rule: its traffic leaves through its own ENI
	if err != nil || !rules.ToMain || (rules.FromTable == 0 && !exclusive) {
		return types.NewError(api.CodeDatapath, fmt.Sprintf("policy rules of %s are incomplete: %+v", ip, rules), fmt.Sprint(err))
	}
	podNS, err := netns.GetFromPath(args.Netns)
	if err != nil {
		return types.NewError(types.ErrIOFailure, "open pod network namespace "+args.Netns, err.Error())
	}
	defer podNS.Close()
	return nsutil.Do(podNS, func() error {
		l, err := netlink.LinkByName(args.IfName)
		if err != nil {
			return types.NewError(api.CodeDatapath, "pod interface "+args.IfName+" is missing", err.Error())
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			return types.NewError(api.CodeDatapath, "list pod addresses", err.Error())
		}
		for _, a := range addrs {
			if a.IP.Equal(ip.AsSlice()) {
				return nil
			}
		}
		return types.NewError(api.CodeDatapath, fmt.Sprintf("pod interface %s lacks %s", args.IfName, ip), fmt.Sprint(addrs))
	})
}

// cmdStatus reports whether pods can be added: the agent must answer and have its pool up.
func cmdStatus(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := api.NewClient(conf.Socket, 5*time.Second).Status(ctx)
	if err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "tern-agent is not reachable on "+conf.Socket, err.Error())
	}
	if !st.Ready {
		return types.NewError(types.ErrPluginNotAvailable, "tern-agent is not ready", st.Message)
	}
	return nil
}

// cmdGC releases every address whose sandbox is not among the runtime's valid attachments.
func cmdGC(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	if conf.ValidAttachments == nil {
		return types.NewError(types.ErrInvalidNetworkConfig,
			"CNI GC without cni.dev/valid-attachments: refusing to read it as \"no attachment is valid\", which would tear down every pod of the node; "+
				"the runtime must list the attachments it still uses (an empty list means none)", "")
	}
	req := api.GCRequest{ValidAttachments: []api.GCAttachment{}}
	for _, v := range *conf.ValidAttachments {
		req.ValidAttachments = append(req.ValidAttachments, api.GCAttachment{ContainerID: v.ContainerID, IfName: v.IfName})
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.timeout)
	defer cancel()
	if _, err := api.NewClient(conf.Socket, conf.timeout).GC(ctx, req); err != nil {
		return cniError(err, api.CodeInternal)
	}
	return nil
}
