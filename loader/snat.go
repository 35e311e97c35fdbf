package loader

import (
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// Masquerade state (bpf/lib/snat.h): the non-masquerade CIDRs the agent writes, the NAT
// entries the datapath writes and the agent garbage-collects, the allocation counters.

// NonMasqKeyOf is the tern_nonmasq key of an IPv4 prefix.
func NonMasqKeyOf(p netip.Prefix) NonMasqKey {
	p = p.Masked()
	return NonMasqKey{Prefixlen: uint32(p.Bits()), Addr: AddrToBE(p.Addr())}
}

// SetNonMasquerade makes tern_nonmasq hold exactly prefixes: the destinations pod traffic
// keeps its own address to. Adds come before deletes, so a prefix that stays is never
// briefly missing (which would masquerade traffic that must not be).
func (m *Maps) SetNonMasquerade(prefixes []netip.Prefix) error {
	want := make(map[NonMasqKey]bool, len(prefixes))
	for _, p := range prefixes {
		if !p.Addr().Is4() {
			return fmt.Errorf("non-masquerade CIDR %s is not IPv4 (the datapath is IPv4 only)", p)
		}
		k := NonMasqKeyOf(p)
		want[k] = true
		if err := m.NonMasq.Put(k, uint8(1)); err != nil {
			return fmt.Errorf("write non-masquerade CIDR %s: %w", p, err)
		}
	}
	have, err := dump[NonMasqKey, uint8](m.NonMasq)
	if err != nil {
		return err
	}
	var errs []error
	for k := range have {
		if want[k] {
			continue
		}
		if err := m.NonMasq.Delete(k); err != nil && !IsNotExist(err) {
			errs = append(errs, fmt.Errorf("delete non-masquerade CIDR %s/%d: %w", BEToAddr(k.Addr), k.Prefixlen, err))
		}
	}
	return errors.Join(errs...)
}

// DumpSNAT reads every NAT entry: translated wire tuple -> the pod's address and port.
func (m *Maps) DumpSNAT() (map[CTKey]SNATValue, error) {
	return dump[CTKey, SNATValue](m.SNAT)
}

// MonotonicNow is the clock the datapath's deadlines use (bpf_ktime_get_coarse_ns:
// CLOCK_MONOTONIC_COARSE), in nanoseconds.
func MonotonicNow() uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC_COARSE, &ts); err != nil {
		// Cannot fail on Linux for this clock; fall back to the fine clock's reading.
		_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	}
	return uint64(ts.Sec)*1e9 + uint64(ts.Nsec)
}

// GCSNAT deletes the NAT entries whose flows expired before now (MonotonicNow): tern_snat
// is a plain hash that the kernel never evicts, so expired entries leave only here (the
// datapath already treats them as free ports). Returns how many it deleted and how many live
// entries remain.
func (m *Maps) GCSNAT(now uint64) (deleted, live int, err error) {
	all, err := m.DumpSNAT()
	if err != nil {
		return 0, 0, err
	}
	var errs []error
	for k, v := range all {
		if v.ExpiresNs >= now {
			live++
			continue
		}
		if err := m.SNAT.Delete(k); err != nil && !IsNotExist(err) {
			errs = append(errs, fmt.Errorf("delete expired NAT entry: %w", err))
			continue
		}
		deleted++
	}
	return deleted, live, errors.Join(errs...)
}

// SNATStatsTotals sums the per-CPU port allocation counters.
func (m *Maps) SNATStatsTotals() (SNATStats, error) {
	var (
		per []SNATStats
		sum SNATStats
	)
	if err := m.SNATStats.Lookup(uint32(0), &per); err != nil {
		return sum, fmt.Errorf("read masquerade allocation counters: %w", err)
	}
	for _, s := range per {
		sum.Allocations += s.Allocations
		sum.Tries += s.Tries
		sum.Failures += s.Failures
	}
	return sum, nil
}
