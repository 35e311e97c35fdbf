package main

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/loader"
)

// The first datapath layout (loader/testdata/v1, commit 4a213e3) is frozen, so its map
// layouts are written here by hand rather than generated: tern_services and tern_backends
// are the same as today's; tern_revnat lists up to 8 frontends per backend.
const v1MaxFrontends = 8

type v1RevNATKey struct {
	Addr  uint32 // big endian
	Port  uint16 // big endian
	Proto uint8
	_     uint8
}

type v1RevNATFrontend struct {
	Addr uint32
	Port uint16
	_    uint16
}

type v1RevNATValue struct {
	Count     uint32
	Frontends [v1MaxFrontends]v1RevNATFrontend
}

// loadV1 loads the v1 pod object into private, unpinned maps, with conntrack sized to
// ctEntries flows per CPU: v1's tern_ct uses per-CPU LRU lists, which divide max_entries
// between the possible CPUs, and the benchmark inserts from one CPU.
func loadV1(path string, ctEntries uint32) (*ebpf.Collection, error) {
	spec, err := ebpf.LoadCollectionSpec(path)
	if err != nil {
		return nil, fmt.Errorf("read the v1 pod object %s (run from the repository root or pass -v1): %w", path, err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("count possible CPUs: %w", err)
	}
	ct, ok := spec.Maps["tern_ct"]
	if !ok {
		return nil, fmt.Errorf("%s has no tern_ct map: not the v1 pod object", path)
	}
	ct.MaxEntries = ctEntries * uint32(cpus)
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		return nil, fmt.Errorf("load the v1 pod object %s: %w", path, err)
	}
	for _, name := range []string{"tern_from_pod", "tern_to_pod"} {
		if coll.Programs[name] == nil {
			coll.Close()
			return nil, fmt.Errorf("%s has no program %s", path, name)
		}
	}
	return coll, nil
}

// seedV1 writes the topology's Services the way v1's loadertest did (backend slots and
// the reverse-NAT index, then the frontend), with batch updates.
func seedV1(coll *ebpf.Collection, t topology) error {
	var (
		sk []loader.ServiceKey
		sv []loader.ServiceValue
		bk []loader.BackendKey
		bv []loader.BackendValue
	)
	revnat := map[v1RevNATKey]*v1RevNATValue{}
	for i := 0; i < t.services; i++ {
		id := uint32(i + 1)
		for slot, b := range t.backends(i) {
			addr, port := loader.AddrToBE(b), loader.PortToBE(backendPort)
			bk = append(bk, loader.BackendKey{SvcId: id, Slot: uint32(slot + 1)})
			bv = append(bv, loader.BackendValue{Addr: addr, Port: port})
			rk := v1RevNATKey{Addr: addr, Port: port, Proto: tcpProto}
			rv := revnat[rk]
			if rv == nil {
				rv = &v1RevNATValue{}
				revnat[rk] = rv
			}
			if rv.Count == v1MaxFrontends {
				return fmt.Errorf("v1 supports at most %d frontends per backend; backend %s would get more", v1MaxFrontends, b)
			}
			rv.Frontends[rv.Count] = v1RevNATFrontend{Addr: loader.AddrToBE(vipOf(i)), Port: loader.PortToBE(vipPort)}
			rv.Count++
		}
		sk = append(sk, loader.ServiceKey{Addr: loader.AddrToBE(vipOf(i)), Port: loader.PortToBE(vipPort), Proto: tcpProto})
		sv = append(sv, loader.ServiceValue{Id: id, BackendCount: uint16(len(t.backends(i)))})
	}
	rk := make([]v1RevNATKey, 0, len(revnat))
	rv := make([]v1RevNATValue, 0, len(revnat))
	for k, v := range revnat {
		rk = append(rk, k)
		rv = append(rv, *v)
	}
	puts := []struct {
		name       string
		keys, vals any
	}{
		{"tern_backends", bk, bv},
		{"tern_revnat", rk, rv},
		{"tern_services", sk, sv},
	}
	for _, p := range puts {
		if _, err := coll.Maps[p.name].BatchUpdate(p.keys, p.vals, nil); err != nil {
			return fmt.Errorf("seed v1 %s for %d Services: %w", p.name, t.services, err)
		}
	}
	return nil
}
