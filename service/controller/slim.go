package controller

import (
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/tern-net/tern/service"
)

// compacter turns the Services and EndpointSlices the informers decode into tern's own
// compact structs (service.Service, service.Slice) before they enter the caches: at 10,000
// Services the caches are most of the agent's memory, and most of an API object is what
// other controllers need (a slice endpoint's pod reference, owner references, selectors,
// managedFields, kubectl's copy of the whole object) or an API type's generality (pointers
// to booleans, addresses and ports as strings). The compact structs hold exactly what
// translation, the health-check servers and Events read, parsed once; strings that repeat
// (namespaces, node names, zone hints) are shared. One compacter serves both informers.
type compacter struct{ c *service.Compactor }

func newCompacter() compacter { return compacter{c: service.NewCompactor()} }

// transform is the informers' cache.TransformFunc. Tombstones and other types pass as they are.
func (t compacter) transform(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Service:
		return t.c.Service(o), nil
	case *discoveryv1.EndpointSlice:
		return t.c.Slice(o), nil
	}
	return obj, nil
}
