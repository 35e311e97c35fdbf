package loader

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
)

// Forwarding is how tern_from_pod hands on a packet it has finished with (bpf/lib/forward.h).
type Forwarding string

const (
	// ForwardRedirect (the default) redirects where the route allows: into a pod on this
	// node with bpf_redirect_peer, out of an ENI or the primary NIC to the FIB's neighbour
	// with bpf_redirect / bpf_redirect_neigh. Whatever the kernel lacks falls back to the
	// stack (see ForwardSupport).
	ForwardRedirect Forwarding = "redirect"
	// ForwardStack hands every packet to the host stack, as tern did before forwarding:
	// for nodes whose routing the FIB lookup cannot express (rules on packet marks) or to
	// compare.
	ForwardStack Forwarding = "stack"
)

// The bits of CFG_FORWARD, mirroring enum fwd_cfg in bpf/lib/forward.h.
const (
	fwdCfgPeer  = 1 << 0
	fwdCfgNeigh = 1 << 1
)

// ForwardSupport is what the loaded programs redirect, after probing the kernel.
type ForwardSupport struct {
	Peer  bool // to local pods with bpf_redirect_peer (Linux 5.10)
	Neigh bool // out of ENIs with bpf_fib_lookup and bpf_redirect_neigh (5.10) / bpf_check_mtu (5.12)
}

func (s ForwardSupport) bits() uint32 {
	var b uint32
	if s.Peer {
		b |= fwdCfgPeer
	}
	if s.Neigh {
		b |= fwdCfgNeigh
	}
	return b
}

// probeForwarding decides what the programs may redirect: nothing for ForwardStack,
// otherwise each kind whose helpers the kernel has. A helper the kernel lacks must never
// be called, and the verifier refuses a program that calls an unknown helper only on a
// path it explores: with CFG_FORWARD a constant, the branches that call it are dead code
// and are pruned, so one object loads on every kernel.
func probeForwarding(mode Forwarding) (ForwardSupport, []string, error) {
	switch mode {
	case ForwardStack:
		return ForwardSupport{}, nil, nil
	case "", ForwardRedirect:
	default:
		return ForwardSupport{}, nil, fmt.Errorf("forwarding mode %q is not one of %q, %q", mode, ForwardRedirect, ForwardStack)
	}
	var missing []string
	have := func(fn asm.BuiltinFunc) bool {
		err := features.HaveProgramHelper(ebpf.SchedCLS, fn)
		if err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
			missing = append(missing, fmt.Sprintf("%s (probe failed: %v)", fn, err))
			return false
		}
		if err != nil {
			missing = append(missing, fn.String())
		}
		return err == nil
	}
	fib := have(asm.FnFibLookup)
	peer := have(asm.FnRedirectPeer)
	neigh := have(asm.FnRedirectNeigh)
	mtu := have(asm.FnCheckMtu)
	return ForwardSupport{Peer: fib && peer, Neigh: fib && neigh && mtu}, missing, nil
}

// Forwarding tells what the loaded programs redirect.
func (d *Datapath) Forwarding() ForwardSupport { return d.fwd }

// markNetdev records (on) or forgets an ENI link or the primary NIC in tern_netdevs, the
// devices the forward stage may redirect out of.
func (d *Datapath) markNetdev(ifindex int, on bool) error {
	k := uint32(ifindex)
	if on {
		if err := d.objs.TernNetdevs.Put(k, uint32(0)); err != nil {
			return fmt.Errorf("record ifindex %d in tern_netdevs: %w", ifindex, err)
		}
		return nil
	}
	if err := d.objs.TernNetdevs.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("remove ifindex %d from tern_netdevs: %w", ifindex, err)
	}
	return nil
}
