package ipam

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/eniconfig"
	"github.com/tern-net/tern/ipam/store"
)

// Kind names a kind of network resource a pod can ask for. One node can offer several at once:
// every node offers its default kind (the ENIIP pool, or the VPC route mode's pod CIDR), and the
// node's configuration (a label) adds the optional kinds of Kinds().
type Kind string

const (
	// KindENIIP is a private address of an ENI shared by many pods (the default; in the VPC
	// route mode an address of the node's pod CIDR stands in for it).
	KindENIIP Kind = "eniip"
	// KindENI is a whole ENI for one pod, moved into the pod's network namespace.
	KindENI Kind = "eni"
	// KindMember (member.go) is a member ENI of the node's trunk ENI, on a VLAN of its own.
)

// ErrKindNotOffered: the pod asks for a kind of resource this node does not offer (the node
// lacks the label that turns the kind on). The scheduler should not have placed it here.
var ErrKindNotOffered = errors.New("this node does not offer the requested kind of network resource")

// Request is what a pod asks of the node.
type Request struct {
	Key PodKey
	// Kind is what the pod asks for; empty means the node's default kind.
	Kind Kind
	// VSwitchIDs and SecurityGroups override eni_conf for this pod (Terway's
	// k8s.aliyun.com/pod-networks annotation). Only kinds that create an ENI per pod use them.
	VSwitchIDs     []string
	SecurityGroups []string
}

// KindCapacity is how many pods of one kind the node can hold.
type KindCapacity struct {
	Kind Kind
	// ExtendedResource is the Node's extended resource for the kind (Terway's names), empty
	// for the default kind (it is bounded by the node's pod count and the annotation instead).
	ExtendedResource string
	// Capacity is how many pods of this kind the node could hold now, counting those it holds
	// (the kinds share the instance's ENI quota, so it shrinks as other kinds take ENIs).
	Capacity int
	InUse    int
}

// Resource is one optional kind of resource a node offers: a new kind implements it in a new
// file and adds its KindSpec to Kinds.
type Resource interface {
	Kind() Kind
	// Start recovers interrupted work from the store (finishing or undoing it with the cloud)
	// and starts any background work.
	Start(ctx context.Context) error
	Stop()
	// Allocate gives the request's pod one resource of the kind, the same one for the same key,
	// recorded in the store before it returns.
	Allocate(ctx context.Context, req Request) (Allocation, error)
	// Release frees key's resource; a key without one is not an error.
	Release(ctx context.Context, key PodKey) error
	Allocations() map[PodKey]Allocation
	// GC releases what gone pods hold and removes cloud objects of the kind the store does
	// not know.
	GC(ctx context.Context, livePods func() map[string]bool) (GCResult, error)
	Capacity() KindCapacity
	// ENIsHeld is how many of the instance's ENIs the kind holds now (all kinds share
	// EniQuantity).
	ENIsHeld() int
	UpdateConfig(cfg eniconfig.Config)
	Collectors() []prometheus.Collector
}

// KindDeps is what an optional kind is built from.
type KindDeps struct {
	Cloud      aliyun.Cloud
	Store      *store.Store
	Config     eniconfig.Config
	InstanceID string
	NodeName   string
	ClusterID  string
	Logger     *zap.Logger
	// OtherENIs counts the ENIs of the instance the node's other kinds hold.
	OtherENIs func() int
	// ListingGrace: how long a listing may lag behind a change (default 10s).
	ListingGrace time.Duration
	Now          func() time.Time
}

// NodeInfo is what decides which optional kinds a node offers.
type NodeInfo struct {
	Labels map[string]string // the Node's labels (or the agent's nodeLabels without a kubeconfig)
	Config eniconfig.Config  // eni_conf (enable_eni_trunking, say)
}

// KindSpec describes an optional kind: how a node opts in, and how to build it.
type KindSpec struct {
	Kind Kind
	// Enabled says whether the node offers the kind.
	Enabled func(NodeInfo) bool
	New     func(KindDeps) (Resource, error)
}

// Kinds lists the optional kinds, in the order they are started. Adding a kind is a new file
// with its KindSpec and one line here.
func Kinds() []KindSpec {
	return []KindSpec{
		exclusiveENISpec(),
		memberENISpec(),
	}
}

// EnabledKinds returns the specs the node turns on.
func EnabledKinds(n NodeInfo) []KindSpec {
	var out []KindSpec
	for _, s := range Kinds() {
		if s.Enabled(n) {
			out = append(out, s)
		}
	}
	return out
}

// TagKind marks an ENI created for one kind other than the ENIIP pool; the pool leaves such
// ENIs alone (it does not adopt or delete them) and counts them against the quota through
// Options.OtherENIs.
const TagKind = "tern.io/kind"

// Node is the node's set of resource kinds behind the one Allocator the agent serves pods
// from: the default kind answers Allocate, the others answer AllocateFor by Kind.
type Node struct {
	base  Allocator
	kinds []Resource
	log   *zap.Logger
}

var _ Allocator = (*Node)(nil)

// NewNode combines the default allocator with optional kinds (none is fine).
func NewNode(base Allocator, kinds []Resource, log *zap.Logger) *Node {
	if log == nil {
		log = zap.NewNop()
	}
	return &Node{base: base, kinds: kinds, log: log}
}

// Base is the default kind's allocator.
func (n *Node) Base() Allocator { return n.base }

// Kinds lists the kinds the node offers, the default first.
func (n *Node) Kinds() []Kind {
	out := []Kind{KindENIIP}
	for _, r := range n.kinds {
		out = append(out, r.Kind())
	}
	return out
}

// ENIsHeldExcept counts the ENIs every kind but k holds: what k shares the quota with.
func (n *Node) ENIsHeldExcept(k Kind) int {
	total := 0
	if k != KindENIIP {
		if h, ok := n.base.(interface{ ENIsHeld() int }); ok {
			total += h.ENIsHeld()
		}
	}
	for _, r := range n.kinds {
		if r.Kind() == k {
			continue
		}
		total += r.ENIsHeld()
		// An ENI the ENIIP pool already counts from its listing (the trunk ENI) still takes
		// a slot the other kinds must see.
		if l, ok := r.(interface{ ListedENIs() int }); ok && k != KindENIIP {
			total += l.ListedENIs()
		}
	}
	return total
}

func (n *Node) resource(k Kind) Resource {
	for _, r := range n.kinds {
		if r.Kind() == k {
			return r
		}
	}
	return nil
}

// Start starts the default kind, then the others.
func (n *Node) Start(ctx context.Context) error {
	if err := n.base.Start(ctx); err != nil {
		return err
	}
	for i, r := range n.kinds {
		if err := r.Start(ctx); err != nil {
			for _, s := range slices.Backward(n.kinds[:i]) {
				s.Stop()
			}
			n.base.Stop()
			return fmt.Errorf("start %s resources: %w", r.Kind(), err)
		}
	}
	return nil
}

// Stop stops every kind, the default last.
func (n *Node) Stop() {
	for _, r := range slices.Backward(n.kinds) {
		r.Stop()
	}
	n.base.Stop()
}

// Allocate serves the default kind.
func (n *Node) Allocate(ctx context.Context, key PodKey) (Allocation, error) {
	return n.AllocateFor(ctx, Request{Key: key})
}

// AllocateFor serves req from the kind it asks for. A sandbox keeps the kind of its first
// allocation: asking again under another kind returns what it holds.
func (n *Node) AllocateFor(ctx context.Context, req Request) (Allocation, error) {
	if al, ok := n.Allocations()[req.Key]; ok {
		return al, nil
	}
	if req.Kind == "" || req.Kind == KindENIIP {
		al, err := n.base.Allocate(ctx, req.Key)
		al.Kind = KindENIIP
		return al, err
	}
	r := n.resource(req.Kind)
	if r == nil {
		return Allocation{}, fmt.Errorf("%w: pod %s/%s asks for %q, the node offers %s (the Node label %s=%s turns exclusive ENIs on, eni_conf enable_eni_trunking member ENIs; see docs/ipam.md)",
			ErrKindNotOffered, req.Key.Namespace, req.Key.Name, req.Kind, kindList(n.Kinds()), LabelExclusiveENI, LabelExclusiveENIOnly)
	}
	return r.Allocate(ctx, req)
}

func kindList(ks []Kind) string {
	s := make([]string, len(ks))
	for i, k := range ks {
		s[i] = string(k)
	}
	return strings.Join(s, ", ")
}

// Release frees whatever key holds, of any kind.
func (n *Node) Release(ctx context.Context, key PodKey) error {
	for _, r := range n.kinds {
		if _, ok := r.Allocations()[key]; ok {
			return r.Release(ctx, key)
		}
	}
	// A sandbox whose ADD failed half way holds no allocation but may hold a kind's record
	// (and its quota): a kind that can tell releases it here, at the sandbox's DEL.
	for _, r := range n.kinds {
		if u, ok := r.(interface {
			ReleaseUnfinished(context.Context, PodKey) error
		}); ok {
			if err := u.ReleaseUnfinished(ctx, key); err != nil {
				return err
			}
		}
	}
	return n.base.Release(ctx, key)
}

// Allocations lists what pods hold, every kind, each with its Kind.
func (n *Node) Allocations() map[PodKey]Allocation {
	out := n.base.Allocations()
	for k, al := range out {
		al.Kind = KindENIIP
		out[k] = al
	}
	for _, r := range n.kinds {
		maps.Copy(out, r.Allocations())
	}
	return out
}

// GC runs every kind's GC and merges the results; one kind's failure does not stop the others.
func (n *Node) GC(ctx context.Context, livePods func() map[string]bool) (GCResult, error) {
	res, err := n.base.GC(ctx, livePods)
	errs := []error{err}
	for _, r := range n.kinds {
		rr, err := r.GC(ctx, livePods)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", r.Kind(), err))
		}
		res.ReleasedAllocations = append(res.ReleasedAllocations, rr.ReleasedAllocations...)
		res.DeletedENIs = append(res.DeletedENIs, rr.DeletedENIs...)
	}
	sort.Slice(res.ReleasedAllocations, func(i, j int) bool {
		return res.ReleasedAllocations[i].key() < res.ReleasedAllocations[j].key()
	})
	return res, errors.Join(errs...)
}

// Status is the default kind's status with every kind's capacity.
func (n *Node) Status() Status {
	s := n.base.Status()
	s.Kinds = append(s.Kinds, KindCapacity{Kind: KindENIIP, Capacity: s.Capacity.MaxPods, InUse: s.InUse})
	for _, r := range n.kinds {
		s.Kinds = append(s.Kinds, r.Capacity())
	}
	return s
}

// UpdateConfig applies a reloaded eni_conf to every kind.
func (n *Node) UpdateConfig(cfg eniconfig.Config) {
	n.base.UpdateConfig(cfg)
	for _, r := range n.kinds {
		r.UpdateConfig(cfg)
	}
}

// Collectors are every kind's metrics.
func (n *Node) Collectors() []prometheus.Collector {
	out := n.base.Collectors()
	for _, r := range n.kinds {
		out = append(out, r.Collectors()...)
	}
	return out
}
