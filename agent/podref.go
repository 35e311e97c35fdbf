package agent

import (
	"sync"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/ipam"
)

func podKey(r api.PodRef) (ipam.PodKey, *api.Error) {
	if err := api.ValidatePodRef(r); err != nil {
		return ipam.PodKey{}, &api.Error{Code: api.CodeInvalidEnv, Msg: err.Error()}
	}
	return ipam.PodKey{Namespace: r.Namespace, Name: r.Name, ContainerID: r.ContainerID}, nil
}

// sandboxLocks serialises the requests about one container ID. Two ADDs of the same sandbox
// (a runtime retrying while the first still waits) must not interleave: the second must see
// what the first did, including an allocation the first released because its client left.
type sandboxLocks struct {
	mu    sync.Mutex
	locks map[string]*sandboxLock
}

type sandboxLock struct {
	mu   sync.Mutex
	refs int
}

func (s *sandboxLocks) lock(containerID string) (unlock func()) {
	s.mu.Lock()
	if s.locks == nil {
		s.locks = map[string]*sandboxLock{}
	}
	l := s.locks[containerID]
	if l == nil {
		l = &sandboxLock{}
		s.locks[containerID] = l
	}
	l.refs++
	s.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		s.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(s.locks, containerID)
		}
		s.mu.Unlock()
	}
}

// sandboxOwner returns the allocation key that already holds containerID, if any.
func sandboxOwner(pool ipam.Allocator, containerID string) (ipam.PodKey, bool) {
	for k := range pool.Allocations() {
		if k.ContainerID == containerID {
			return k, true
		}
	}
	return ipam.PodKey{}, false
}
