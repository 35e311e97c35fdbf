package agent

import (
	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/ipam/aliyun"
)

// AllocatorWrapper puts a layer over the node's ENIIP pool before it starts (under the optional kinds' ipam.Node): the Kubernetes
// component gives StatefulSet pods their fixed addresses this way (ipam/fixedip), since the
// decision needs the pod's annotations and the apiserver's records, which the agent core
// does not read. A wrapper returns the allocator unchanged when it does not apply (VPC route
// mode).
type AllocatorWrapper func(pool ipam.Allocator, cloud *aliyun.Client) (ipam.Allocator, error)

// WrapAllocator registers w; call it before Run.
func (a *Agent) WrapAllocator(w AllocatorWrapper) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.wrappers = append(a.wrappers, w)
}

func (a *Agent) wrapAllocator(pool ipam.Allocator, cloud *aliyun.Client) (ipam.Allocator, error) {
	a.mu.Lock()
	ws := append([]AllocatorWrapper(nil), a.wrappers...)
	a.mu.Unlock()
	for _, w := range ws {
		var err error
		if pool, err = w(pool, cloud); err != nil {
			return nil, err
		}
	}
	return pool, nil
}
