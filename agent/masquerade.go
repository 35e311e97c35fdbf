package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/metadata"
	"github.com/tern-net/tern/loader"
)

// MasqueradeConfig turns on eBPF masquerade (bpf/lib/snat.h): pod traffic to destinations
// outside the non-masquerade set leaves with the node's primary address. Field names follow
// ip-masq-agent's config (nonMasqueradeCIDRs, masqLinkLocal) where it has one.
type MasqueradeConfig struct {
	// Enabled turns masquerade on. Default off: on Alibaba Cloud a pod's address is a VPC
	// address, and clusters reach the internet through the VPC's NAT gateway (SNAT entries
	// per vSwitch), as with Terway; masquerade is for clusters without one.
	Enabled bool `json:"enabled,omitempty"`
	// VPCCIDRs are the VPC's CIDR blocks (primary and secondary). Empty: read
	// vpc-cidr-block from the instance metadata service at start. Pods keep their own
	// address inside the VPC.
	VPCCIDRs []string `json:"vpcCIDRs,omitempty"`
	// NonMasqueradeCIDRs are further destinations pods keep their address to (peered VPCs,
	// on-premises ranges over Express Connect), ip-masq-agent's spelling. eni_conf's
	// service_cidr is added on its own.
	NonMasqueradeCIDRs []string `json:"nonMasqueradeCIDRs,omitempty"`
	// MasqLinkLocal masquerades traffic to 169.254.0.0/16 too (ip-masq-agent's option,
	// default false: link-local stays on the node's segment).
	MasqLinkLocal bool `json:"masqLinkLocal,omitempty"`
	// PortMin is the lowest port a flow gets when its own is taken (default 1024; the range
	// runs to 65535). PortTries bounds the candidates one new flow looks at (default 32).
	PortMin   uint16 `json:"portMin,omitempty"`
	PortTries uint32 `json:"portTries,omitempty"`
	// MaxFlows sizes the NAT map (default 131072 masqueraded flows; fixed at first pin).
	MaxFlows uint32 `json:"maxFlows,omitempty"`
	// GCInterval is how often expired NAT entries are deleted (default 30s).
	GCInterval Duration `json:"gcInterval,omitempty"`
}

func (m MasqueradeConfig) validate() []error {
	var errs []error
	for _, list := range []struct {
		name  string
		cidrs []string
	}{{"masquerade.vpcCIDRs", m.VPCCIDRs}, {"masquerade.nonMasqueradeCIDRs", m.NonMasqueradeCIDRs}} {
		for _, c := range list.cidrs {
			if p, err := netip.ParsePrefix(strings.TrimSpace(c)); err != nil || !p.Addr().Is4() {
				errs = append(errs, fmt.Errorf("%s entry %q is not an IPv4 CIDR such as \"192.168.0.0/16\"", list.name, c))
			}
		}
	}
	if m.PortMin != 0 && m.PortMin < 1024 {
		errs = append(errs, fmt.Errorf("masquerade.portMin %d is below 1024: privileged source ports mean something to some servers (NFS, rsh); use 1024 or more", m.PortMin))
	}
	if m.PortTries > 256 {
		errs = append(errs, fmt.Errorf("masquerade.portTries %d is above the datapath's bound 256", m.PortTries))
	}
	if m.GCInterval < 0 {
		errs = append(errs, fmt.Errorf("masquerade.gcInterval %s is negative", time.Duration(m.GCInterval)))
	}
	return errs
}

// masqueradeLoadConfig fills the loader's masquerade fields: the primary NIC and its first
// IPv4 address. With masquerade off it leaves them zero.
func (a *Agent) masqueradeLoadConfig(cfg *loader.Config) error {
	m := a.cfg.Masquerade
	if !m.Enabled {
		return nil
	}
	idx, err := primaryNIC()
	if err != nil {
		return fmt.Errorf("masquerade is enabled but %w", err)
	}
	lk, err := netlink.LinkByIndex(idx)
	if err != nil {
		return fmt.Errorf("masquerade: read the primary NIC (ifindex %d): %w", idx, err)
	}
	addrs, err := netlink.AddrList(lk, netlink.FAMILY_V4)
	if err != nil || len(addrs) == 0 {
		return fmt.Errorf("masquerade: the primary NIC %s has no IPv4 address to masquerade pods to (err %v); configure it or turn masquerade.enabled off",
			lk.Attrs().Name, err)
	}
	addr, _ := netip.AddrFromSlice(addrs[0].IP.To4())
	cfg.MasqAddr = addr
	cfg.MasqIfindex = idx
	cfg.SNATPortMin = m.PortMin
	cfg.SNATTries = m.PortTries
	cfg.MaxSNATFlows = m.MaxFlows
	a.log.Info("masquerade on", zap.String("address", addr.String()), zap.String("interface", lk.Attrs().Name))
	return nil
}

// nonMasqueradeSet is what pods keep their own address to: the VPC, the service CIDR, the
// configured extra CIDRs and (unless masqLinkLocal) link-local.
func (a *Agent) nonMasqueradeSet(ctx context.Context, eniCfg eniconfig.Config) ([]netip.Prefix, error) {
	m := a.cfg.Masquerade
	vpc := m.VPCCIDRs
	if len(vpc) == 0 {
		c, err := metadata.New(a.cfg.MetadataEndpoint).Get(ctx, "vpc-cidr-block", 30*time.Second)
		if err != nil {
			return nil, fmt.Errorf("masquerade needs the VPC CIDR (pods keep their address inside the VPC): set masquerade.vpcCIDRs, or %w", err)
		}
		vpc = []string{c}
	}
	var out []netip.Prefix
	for _, c := range append(append([]string{}, vpc...), m.NonMasqueradeCIDRs...) {
		p, err := netip.ParsePrefix(strings.TrimSpace(c))
		if err != nil {
			return nil, fmt.Errorf("masquerade: non-masquerade CIDR %q: %w", c, err)
		}
		out = append(out, p)
	}
	if eniCfg.ServiceCIDR.IsValid() {
		out = append(out, eniCfg.ServiceCIDR)
	}
	if !m.MasqLinkLocal {
		out = append(out, netip.MustParsePrefix("169.254.0.0/16"))
	}
	return out, nil
}

// syncNonMasquerade writes the non-masquerade set into the datapath.
func (a *Agent) syncNonMasquerade(ctx context.Context, dp *loader.Datapath, eniCfg eniconfig.Config) error {
	if !a.cfg.Masquerade.Enabled {
		return nil
	}
	set, err := a.nonMasqueradeSet(ctx, eniCfg)
	if err != nil {
		return err
	}
	if err := dp.Maps().SetNonMasquerade(set); err != nil {
		return fmt.Errorf("masquerade: %w", err)
	}
	a.log.Info("non-masquerade destinations", zap.Stringers("cidrs", set))
	return nil
}

// runSNATGC deletes expired NAT entries every interval until ctx ends: the NAT map is never
// evicted by the kernel, so this is what frees its memory (the datapath already reuses an
// expired entry's port).
func (a *Agent) runSNATGC(ctx context.Context, dp *loader.Datapath) {
	iv := time.Duration(a.cfg.Masquerade.GCInterval)
	if iv == 0 {
		iv = 30 * time.Second
	}
	t := time.NewTicker(iv)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		deleted, live, err := dp.Maps().GCSNAT(loader.MonotonicNow())
		if err != nil && !errors.Is(err, context.Canceled) {
			a.log.Warn("masquerade GC could not delete every expired NAT entry", zap.Error(err))
		}
		if deleted > 0 {
			a.log.Debug("masquerade GC", zap.Int("deleted", deleted), zap.Int("live", live))
		}
	}
}
