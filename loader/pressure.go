package loader

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// countChunk is how many entries one batch syscall reads when counting a map.
const countChunk = 4096

// CountEntries counts the entries of a hash, LRU or LPM map: batched where the kernel can
// (a 524,288-entry conntrack map in 128 syscalls), entry by entry where it cannot.
func CountEntries(m *ebpf.Map) (int, error) {
	keys := make([]byte, int(m.KeySize())*countChunk)
	vals := make([]byte, int(m.ValueSize())*countChunk)
	var cursor ebpf.MapBatchCursor
	total := 0
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		total += n
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return total, nil
		}
		if err != nil {
			if total == 0 {
				return countByIteration(m)
			}
			return 0, fmt.Errorf("count entries of %s: %w", m, err)
		}
	}
}

func countByIteration(m *ebpf.Map) (int, error) {
	var k, v []byte
	n := 0
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("count entries of %s: %w", m, err)
	}
	return n, nil
}

// Pressure is how full one map is.
type Pressure struct {
	Name     string
	Entries  int
	Capacity int
}

// Pressure counts the entries of the maps that fill with traffic or with the cluster's size
// (conntrack, frontends, backend slots and membership, endpoints, ipcache, masquerade NAT), for the agent's
// map-pressure metrics. An LRU map at capacity is evicting its least recently used flows.
func (m *Maps) Pressure() ([]Pressure, error) {
	var out []Pressure
	var errs []error
	for _, mp := range []struct {
		name string
		m    *ebpf.Map
	}{{PodMapTernConntrack, m.CT}, {PodMapTernServices, m.Services}, {PodMapTernBackends, m.Backends},
		{PodMapTernLbMembers, m.Members}, {PodMapTernEndpoints, m.Endpoints}, {PodMapTernIpcache, m.IPCache},
		{PodMapTernSnat, m.SNAT}} {
		if mp.m == nil {
			continue
		}
		n, err := CountEntries(mp.m)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, Pressure{Name: mp.name, Entries: n, Capacity: int(mp.m.MaxEntries())})
	}
	return out, errors.Join(errs...)
}
