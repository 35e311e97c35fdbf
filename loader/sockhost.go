package loader

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// SockHost tells the socket hooks which network namespace is the node's own and which
// address its connections leave by. They need it for loadBalancerSourceRanges: a
// host-network process's unbound socket has no source address when connect() runs (the
// kernel routes it afterwards), and the tc path never sees the node's own packets, so the
// hook checks the ranges against Addr, the address the node's default route gives a
// connection to a LoadBalancer IP (the primary NIC's, as kube-proxy's OUTPUT rules see it).
// A pod's unbound socket is left to the tc path instead, which checks the real source.
type SockHost struct {
	// NetnsCookie is the node namespace's netns cookie (NetnsCookie); 0: unknown, host
	// sockets are then treated as pods' (left untranslated for source-range frontends).
	NetnsCookie uint64
	// Addr is the node's primary IPv4 address; invalid: as NetnsCookie 0.
	Addr netip.Addr
}

// CurrentNetnsCookie is the netns cookie (SO_NETNS_COOKIE, Linux 5.14) of the calling
// thread's network namespace, as bpf_get_netns_cookie gives it for that namespace's sockets.
// On an older kernel it returns an error wrapping ebpf.ErrNotSupported.
func CurrentNetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket to read the netns cookie: %w", err)
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if errors.Is(err, unix.ENOPROTOOPT) {
		return 0, fmt.Errorf("SO_NETNS_COOKIE (Linux 5.14): %w", ebpf.ErrNotSupported)
	}
	if err != nil {
		return 0, fmt.Errorf("read SO_NETNS_COOKIE: %w", err)
	}
	return c, nil
}

// setSockHost writes h into the sock object's load-time variables.
func setSockHost(spec *ebpf.CollectionSpec, h SockHost) error {
	if !h.Addr.Is4() {
		h = SockHost{}
	}
	var addr uint32
	if h.Addr.IsValid() {
		addr = AddrToBE(h.Addr)
	}
	if err := spec.Variables[SockVarCFG_SOCK_HOST_NETNS].Set(h.NetnsCookie); err != nil {
		return fmt.Errorf("set load-time variable %s: %w", SockVarCFG_SOCK_HOST_NETNS, err)
	}
	if err := spec.Variables[SockVarCFG_SOCK_HOST_ADDR].Set(addr); err != nil {
		return fmt.Errorf("set load-time variable %s: %w", SockVarCFG_SOCK_HOST_ADDR, err)
	}
	return nil
}
