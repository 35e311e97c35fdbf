package ternctl

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/loader"
)

// openMaps opens the datapath's pinned maps read-only. A missing pin root or map is
// ExitNoDatapath.
func (e *env) openMaps() (*loader.Maps, error) {
	m, err := loader.OpenPinnedMaps(e.opts.PinRoot)
	if err != nil {
		return nil, e.pinErr(err)
	}
	return m, nil
}

// openMap opens one pinned map by its name in the objects (loader.PodMap...), read-only.
// A view of a map outside loader.Maps (NAT, bandwidth, policy) uses this.
func (e *env) openMap(name string) (*ebpf.Map, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(e.opts.PinRoot, name), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, e.pinErr(fmt.Errorf("open pinned map %s under %s: %w", name, e.opts.PinRoot, err))
	}
	return m, nil
}

func (e *env) pinErr(err error) error {
	if errors.Is(err, os.ErrNotExist) {
		return withCode(ExitNoDatapath, fmt.Errorf("%w; is tern-agent running on this node with this pin root? (--pin-root)", err))
	}
	if errors.Is(err, os.ErrPermission) {
		return withCode(ExitFailure, fmt.Errorf("%w; reading BPF maps needs root (CAP_BPF and CAP_SYS_ADMIN)", err))
	}
	return withCode(ExitFailure, err)
}

// podAddr resolves a --pod value: "namespace/name" (asked of the agent) or an address.
func (e *env) podAddr(ctx context.Context, pod string) (netip.Addr, error) {
	if a, err := netip.ParseAddr(pod); err == nil {
		return a, nil
	}
	ns, name, ok := strings.Cut(pod, "/")
	if !ok || ns == "" || name == "" {
		return netip.Addr{}, usageErr("--pod %q: want namespace/name or the pod's address", pod)
	}
	pods, err := e.podsByKey(ctx)
	if err != nil {
		return netip.Addr{}, e.agentErr(fmt.Sprintf("find pod %s (pass its address to --pod to filter without the agent)", pod), err)
	}
	a, ok := pods[ns+"/"+name]
	if !ok {
		return netip.Addr{}, withCode(ExitFailure, fmt.Errorf("the agent holds no address for pod %s on this node", pod))
	}
	return a, nil
}

// podsByKey maps "namespace/name" to the pod's address, from the agent's allocations.
func (e *env) podsByKey(ctx context.Context) (map[string]netip.Addr, error) {
	st, err := e.client().State(ctx)
	if err != nil {
		return nil, err
	}
	out := make(map[string]netip.Addr, len(st.Allocations))
	for k, a := range st.Allocations {
		// Keys are namespace/name/containerID.
		parts := strings.SplitN(k, "/", 3)
		if len(parts) < 2 {
			continue
		}
		if ip, err := netip.ParseAddr(a.IP); err == nil {
			out[parts[0]+"/"+parts[1]] = ip
		}
	}
	return out, nil
}

// podNames maps addresses back to "namespace/name", or nil when the agent does not answer
// (views still print, without names).
func (e *env) podNames(ctx context.Context) map[netip.Addr]string {
	pods, err := e.podsByKey(ctx)
	if err != nil {
		return nil
	}
	out := make(map[netip.Addr]string, len(pods))
	for k, a := range pods {
		out[a] = k
	}
	return out
}

// Proto names an IP protocol number.
func Proto(p uint8) string {
	switch p {
	case 1:
		return "ICMP"
	case 6:
		return "TCP"
	case 17:
		return "UDP"
	case 132:
		return "SCTP"
	}
	return fmt.Sprint(p)
}

func ap(addr uint32, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(loader.BEToAddr(addr), loader.BEToPort(port))
}

// exclusivePodOf is the address of the local exclusive-ENI pod with identity id, from
// tern_endpoints; invalid when there is none or more than one (replicas of one identity on
// the node cannot be told apart by the identity alone).
func (e *env) exclusivePodOf(id uint32) netip.Addr {
	m, err := e.openMap(loader.PodMapTernEndpoints)
	if err != nil {
		return netip.Addr{}
	}
	defer m.Close()
	var (
		k     loader.EndpointKey
		v     loader.EndpointValue
		found netip.Addr
		n     int
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		if v.Identity == id && v.Flags&loader.EndpointFlagExclusive != 0 {
			found = loader.BEToAddr(v.Addr)
			n++
		}
	}
	if it.Err() != nil || n != 1 {
		return netip.Addr{}
	}
	return found
}
