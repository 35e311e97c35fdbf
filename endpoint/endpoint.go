// Package endpoint keeps the datapath's record of the pods it serves: the endpoint registry
// (per local pod: its host veth, address, MAC and per-endpoint settings) and the ipcache
// (what identity and node an address or CIDR belongs to). Each map has one reconciler that
// mirrors what it wrote; the agent calls them when it attaches or detaches a pod and when
// it starts. NetworkPolicy, bandwidth and direct forwarding read these maps.
package endpoint

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/tern-net/tern/loader"
)

// Endpoint is one local pod as the datapath sees it.
type Endpoint struct {
	IfIndex  int              // the host-side veth
	Addr     netip.Addr       // the pod's IPv4 address
	MAC      net.HardwareAddr // the pod's eth0 MAC (may be nil when unknown)
	Flags    uint16           // loader.EndpointFlag*
	Identity uint32           // numeric identity of the pod's labels; 0 until policy assigns one
	BWSlot   uint32           // bandwidth settings slot; 0 none
	Pod      string           // "namespace/name" when known (attach); not kept in the map
}

func (e Endpoint) value() (loader.EndpointValue, error) {
	if !e.Addr.Is4() {
		return loader.EndpointValue{}, fmt.Errorf("endpoint on ifindex %d: address %s is not IPv4", e.IfIndex, e.Addr)
	}
	v := loader.EndpointValue{Addr: loader.AddrToBE(e.Addr), Flags: e.Flags, Identity: e.Identity, BwSlot: e.BWSlot}
	if e.MAC != nil {
		if len(e.MAC) != 6 {
			return v, fmt.Errorf("endpoint on ifindex %d: MAC %s is not 6 bytes", e.IfIndex, e.MAC)
		}
		copy(v.Mac[:], e.MAC)
	}
	return v, nil
}

// Maps is the kernel seam of the two reconcilers; loader.Maps implements it.
type Maps interface {
	DumpEndpoints() (map[loader.EndpointKey]loader.EndpointValue, error)
	PutEndpoint(loader.EndpointKey, loader.EndpointValue) error
	DeleteEndpoint(loader.EndpointKey) error
	DumpIPCache() (map[loader.IPCacheKey]loader.IPCacheValue, error)
	PutIPCache(loader.IPCacheKey, loader.IPCacheValue) error
	DeleteIPCache(loader.IPCacheKey) error
}

// Registry reconciles tern_endpoints and, for each local pod, its /32 in the ipcache.
type Registry struct {
	maps  Maps
	cache *IPCache

	mu     sync.Mutex
	mirror map[int]loader.EndpointValue
	pods   map[int]string // ifindex -> "namespace/name", as attach named them
	policy PolicyFunc     // NetworkPolicy's identity and enforcement per pod (policy.go)
}

// NewRegistry starts from what the maps hold (left by a previous agent: the pods are still
// running and their programs attached).
func NewRegistry(m Maps, cache *IPCache) (*Registry, error) {
	cur, err := m.DumpEndpoints()
	if err != nil {
		return nil, fmt.Errorf("read endpoint map: %w", err)
	}
	r := &Registry{maps: m, cache: cache, mirror: make(map[int]loader.EndpointValue, len(cur)), pods: map[int]string{}}
	for k, v := range cur {
		r.mirror[int(k.Ifindex)] = v
	}
	return r, nil
}

// Upsert records a local pod: its endpoint entry, then its address in the ipcache.
func (r *Registry) Upsert(e Endpoint) error {
	if e.IfIndex <= 0 {
		return fmt.Errorf("endpoint %s: ifindex %d is not a valid interface index", e.Addr, e.IfIndex)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if e.Pod != "" {
		r.pods[e.IfIndex] = e.Pod
	} else {
		e.Pod = r.pods[e.IfIndex]
	}
	r.applyPolicyLocked(&e)
	v, err := e.value()
	if err != nil {
		return err
	}
	old, had := r.mirror[e.IfIndex]
	if !had || old != v {
		if err := r.maps.PutEndpoint(loader.EndpointKey{Ifindex: uint32(e.IfIndex)}, v); err != nil {
			return fmt.Errorf("write endpoint %s on ifindex %d: %w", e.Addr, e.IfIndex, err)
		}
		r.mirror[e.IfIndex] = v
	}
	// An interface index reused by a new pod: the old pod's address is no longer local.
	if had && old.Addr != v.Addr {
		if err := r.cache.Delete(netip.PrefixFrom(loader.BEToAddr(old.Addr), 32)); err != nil {
			return err
		}
	}
	return r.cache.Set(netip.PrefixFrom(e.Addr, 32), localEntry(v))
}

// localEntry is the ipcache entry of a local pod's address, derived from its endpoint.
func localEntry(v loader.EndpointValue) Entry {
	flags := uint16(loader.IPCacheFlagLocal | loader.IPCacheFlagPod)
	// Flows to an exclusive-ENI pod are translated to the node's address, so that its
	// answer comes back through its veth (bpf/lib/exclusive.h); the stages that open them
	// judge its ingress policy against the real client, if it is enforced on the pod
	// (bpf/lib/policy.h, policy_local_backend_ingress).
	if v.Flags&loader.EndpointFlagExclusive != 0 {
		flags |= loader.IPCacheFlagExclusive
	}
	if v.Flags&loader.EndpointFlagPolicy != 0 {
		flags |= loader.IPCacheFlagPolicy
	}
	return Entry{Identity: v.Identity, Flags: flags}
}

// RestoreIPCache rewrites the ipcache entry of every endpoint recorded (found in the map at
// start, left by a previous agent) as Upsert would write it. An entry written by an older
// agent then gains the flags it lacks (IPCacheFlagExclusive, IPCacheFlagPolicy) at once,
// not at the pod's next attach or policy sync; an unchanged entry costs no write. It
// returns how many entries it wrote.
func (r *Registry) RestoreIPCache() (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	n := 0
	for _, v := range r.mirror {
		p := netip.PrefixFrom(loader.BEToAddr(v.Addr), 32)
		want := localEntry(v)
		if old, ok := r.cache.Lookup(p); ok && old == want {
			continue
		}
		if err := r.cache.Set(p, want); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// Delete forgets the pod on ifindex (a missing one is not an error: teardown repeats).
func (r *Registry) Delete(ifindex int) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.deleteLocked(ifindex)
}

func (r *Registry) deleteLocked(ifindex int) error {
	old, had := r.mirror[ifindex]
	if !had {
		return nil
	}
	if err := r.maps.DeleteEndpoint(loader.EndpointKey{Ifindex: uint32(ifindex)}); err != nil && !loader.IsNotExist(err) {
		return fmt.Errorf("delete endpoint on ifindex %d: %w", ifindex, err)
	}
	delete(r.mirror, ifindex)
	delete(r.pods, ifindex)
	return r.cache.Delete(netip.PrefixFrom(loader.BEToAddr(old.Addr), 32))
}

// Prune removes the endpoints whose interface is gone (pods deleted while the agent was
// away), as the agent's start and GC decide with alive. It returns how many went.
func (r *Registry) Prune(alive func(ifindex int) bool) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	n := 0
	for ifindex := range r.mirror {
		if alive(ifindex) {
			continue
		}
		if err := r.deleteLocked(ifindex); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// List returns the recorded endpoints (for ternctl and tests).
func (r *Registry) List() []Endpoint {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Endpoint, 0, len(r.mirror))
	for ifindex, v := range r.mirror {
		e := Endpoint{IfIndex: ifindex, Addr: loader.BEToAddr(v.Addr), Flags: v.Flags, Identity: v.Identity, BWSlot: v.BwSlot,
			Pod: r.pods[ifindex]}
		if v.Mac != ([6]byte{}) {
			e.MAC = net.HardwareAddr(append([]byte(nil), v.Mac[:]...))
		}
		out = append(out, e)
	}
	return out
}

// Entry is what the ipcache says about an address or CIDR.
type Entry struct {
	Identity uint32
	Node     netip.Addr // the node it lives on; invalid when outside the cluster
	Flags    uint16     // loader.IPCacheFlag*
}

// IPCache reconciles tern_ipcache.
type IPCache struct {
	maps Maps

	mu     sync.Mutex
	mirror map[netip.Prefix]loader.IPCacheValue
}

// NewIPCache starts from what the map holds.
func NewIPCache(m Maps) (*IPCache, error) {
	cur, err := m.DumpIPCache()
	if err != nil {
		return nil, fmt.Errorf("read ipcache map: %w", err)
	}
	c := &IPCache{maps: m, mirror: make(map[netip.Prefix]loader.IPCacheValue, len(cur))}
	for k, v := range cur {
		c.mirror[netip.PrefixFrom(loader.BEToAddr(k.Addr), int(k.Prefixlen))] = v
	}
	return c, nil
}

func ipcacheKey(p netip.Prefix) loader.IPCacheKey {
	return loader.IPCacheKey{Prefixlen: uint32(p.Bits()), Addr: loader.AddrToBE(p.Masked().Addr())}
}

// Set writes what prefix belongs to, if it changed.
func (c *IPCache) Set(p netip.Prefix, e Entry) error {
	if !p.Addr().Is4() {
		return fmt.Errorf("ipcache: %s is not an IPv4 prefix", p)
	}
	p = p.Masked()
	v := loader.IPCacheValue{Identity: e.Identity, Flags: e.Flags}
	if e.Node.IsValid() {
		v.NodeAddr = loader.AddrToBE(e.Node)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if old, ok := c.mirror[p]; ok && old == v {
		return nil
	}
	if err := c.maps.PutIPCache(ipcacheKey(p), v); err != nil {
		return fmt.Errorf("write ipcache entry %s: %w", p, err)
	}
	c.mirror[p] = v
	return nil
}

// Delete removes prefix (a missing one is not an error).
func (c *IPCache) Delete(p netip.Prefix) error {
	p = p.Masked()
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.maps.DeleteIPCache(ipcacheKey(p)); err != nil && !loader.IsNotExist(err) {
		return fmt.Errorf("delete ipcache entry %s: %w", p, err)
	}
	delete(c.mirror, p)
	return nil
}

// Lookup returns the entry for exactly prefix, as written (for tests and ternctl).
func (c *IPCache) Lookup(p netip.Prefix) (Entry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.mirror[p.Masked()]
	if !ok {
		return Entry{}, false
	}
	e := Entry{Identity: v.Identity, Flags: v.Flags}
	if v.NodeAddr != 0 {
		e.Node = loader.BEToAddr(v.NodeAddr)
	}
	return e, true
}
