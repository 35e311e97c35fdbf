package policy

import (
	"cmp"
	"errors"
	"maps"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
)

// Compiler is the incremental form of Compile: it is told of changes one object at a time
// and recompiles only the policies a change can affect, keeping one Desired up to date.
//
//   - A pod whose shape (namespace labels, labels, named ports) does not change — a status
//     update, a new address — touches only its ipcache entries.
//   - A pod that brings a shape no other pod has adds an identity: the policies whose
//     podSelector or some peer selects it (or that resolve an egress named port on any
//     peer) are recompiled. A shape whose last pod leaves: the policies that referred to
//     its identity are.
//   - A namespace's labels change every shape of the namespace: the same, for each.
//   - A policy: only itself; when the set of ipBlock prefixes changes, also every policy
//     with an ipBlock peer (a new prefix inside a block must be allowed by it).
//
// Each policy's contribution is kept, and every rule entry remembers the policies that
// produce it, so a recompiled policy is taken out and put back without touching the rest.
//
// Differences from Compile, both harmless: a rule's value names the first producing policy
// in namespace/name order by a stable slot number (Desired.Policies[slot]; a deleted
// policy's slot is "" until reused) instead of its position in a sorted list, so adding a
// policy does not rewrite every other policy's entries; and two shape descriptions whose
// hashes collide are separated in arrival order, not sorted order (identities are local to
// a node, docs/networkpolicy.md).
//
// Not safe for concurrent use. Desired returns the Compiler's own state: read it before
// the next change.
type Compiler struct {
	d        *Desired
	nodeAddr []netip.Addr
	nsLabels map[string]map[string]string // namespace -> labels with kubernetes.io/metadata.name
	pods     map[types.NamespacedName]*podEntry
	// owners lists the pods claiming each address (an old pod can linger while its address
	// is reused): the ipcache gives the address the identity of the last one set.
	owners4  map[netip.Addr][]types.NamespacedName
	shapes   map[string]*shapeInfo // canonical -> shape; shapeInfo.pods counts its pods
	byID     map[Identity]*shapeInfo
	order    []*shapeInfo // by identity, as Compile orders them
	taken    map[Identity]bool
	policies map[types.NamespacedName]*policyEntry
	slots    []string // slot -> namespace/name ("" free)
	// reserved: slots kept for policies a previous agent had (ReserveSlots), by name and
	// by slot.
	reserved     map[string]uint32
	reservedSlot map[uint32]bool
	owners       map[RuleKey][]uint32
	isoCount     map[Identity]*[2]int // ingress, egress: how many policies isolate it
	// isoOwners and selOwners: the slots of the policies isolating an identity in a
	// direction (Desired.IsolatedBy names the first) and selecting it (Desired.Selecting).
	isoOwners map[IsolationKey][]uint32
	selOwners map[Identity][]uint32
	// podPfx is, for the ipBlock /32 prefixes that are pod addresses (named ports on
	// ipBlocks, docs/networkpolicy.md), the pod identity the last CIDR allocation saw;
	// podPrefix is what the contributions read.
	podPfx    map[netip.Prefix]Identity
	podPrefix map[Identity]netip.Prefix
	allocated map[netip.Prefix]bool // the prefixes the CIDR identities were allocated for
	index     *cidrIndex            // Desired.CIDRs sorted, for resolving ipBlock peers
	// cidrCapacity is how many prefixes tern_policy_cidrs holds (0: no limit): Desired
	// refuses a state with more before compiling anything (SetCIDRCapacity).
	cidrCapacity int
	prefixes     map[netip.Prefix]int // ipBlock prefix -> how many policies name it
	dirty        map[types.NamespacedName]bool
	cidrsSet     bool // prefixes changed since the last flush
	// recompiled counts the policies the last Desired call compiled (tests, debug logs).
	recompiled int
	// bySubject indexes the rule entries by subject; touched collects the subjects whose
	// rules or isolation changed since the last TakeTouched, so the writer can rewrite
	// only those (policymap.Writer.SyncSubjects).
	bySubject map[Identity]map[RuleKey]struct{}
	touched   map[Identity]bool
}

// TakeTouched returns the identities whose rules or isolation changed since the last call
// (every identity with rules, the first time) and starts a new set.
func (c *Compiler) TakeTouched() map[Identity]bool {
	t := c.touched
	c.touched = map[Identity]bool{}
	return t
}

// RulesOf is the rule entries of one subject identity (values in Desired.Rules). The map
// is the Compiler's own: read it before the next change.
func (c *Compiler) RulesOf(id Identity) map[RuleKey]struct{} { return c.bySubject[id] }

// Recompiled is how many policies the last Desired call compiled.
func (c *Compiler) Recompiled() int { return c.recompiled }

type podEntry struct {
	shape string
	addrs []netip.Addr
}

type policyEntry struct {
	np       *networkingv1.NetworkPolicy
	blocks   []namedBlock // egress ipBlock peers with named ports
	slot     uint32
	sel      *policySelectors // nil: a selector does not parse (recompiled on every shape change)
	contrib  *contribution
	prefixes []netip.Prefix
	errs     []error
}

// policySelectors are a policy's parsed selectors, to test a new shape against it cheaply.
type policySelectors struct {
	pod   labels.Selector
	peers []peerSelector
}

type peerSelector struct{ ns, pod labels.Selector } // nil: absent

// NewCompiler starts from an empty cluster. nodeAddrs are the local node's addresses.
func NewCompiler(nodeAddrs []netip.Addr) *Compiler {
	c := &Compiler{
		d: &Desired{Shapes: map[Identity]string{}, Namespace: map[Identity]string{}, PodIdentity: map[types.NamespacedName]Identity{},
			IPCache: map[netip.Addr]Identity{}, CIDRs: map[netip.Prefix]Identity{}, Isolation: map[Identity]uint32{}, Rules: map[RuleKey]uint32{},
			IsolatedBy: map[IsolationKey]uint32{}, Selecting: map[Identity][]uint32{}},
		nodeAddr: slices.Clone(nodeAddrs),
		nsLabels: map[string]map[string]string{}, pods: map[types.NamespacedName]*podEntry{}, shapes: map[string]*shapeInfo{},
		owners4: map[netip.Addr][]types.NamespacedName{},
		byID:    map[Identity]*shapeInfo{}, taken: map[Identity]bool{}, policies: map[types.NamespacedName]*policyEntry{},
		owners: map[RuleKey][]uint32{}, isoCount: map[Identity]*[2]int{}, prefixes: map[netip.Prefix]int{},
		dirty: map[types.NamespacedName]bool{}, bySubject: map[Identity]map[RuleKey]struct{}{}, touched: map[Identity]bool{},
		isoOwners: map[IsolationKey][]uint32{}, selOwners: map[Identity][]uint32{},
		podPfx: map[netip.Prefix]Identity{}, podPrefix: map[Identity]netip.Prefix{},
	}
	for _, a := range c.nodeAddr {
		c.d.CIDRs[netip.PrefixFrom(a, a.BitLen())] = IdentityHost
	}
	c.index = newCIDRIndex(c.d.CIDRs)
	return c
}

// SetCIDRCapacity tells the Compiler how many prefixes the policy CIDR map holds (the
// agent's maxPolicyCIDRs). Desired then fails fast with a *CIDROverflowError when the
// policies name more, before compiling any rule; the changes stay pending, and once
// policies are deleted or shrunk until they fit the next Desired compiles them. The Desired
// returned with that error is half-updated (a changed policy's old rules are already out):
// write nothing from it, so the maps keep the last state that fitted.
func (c *Compiler) SetCIDRCapacity(n int) { c.cidrCapacity = n }

// CompileIncremental feeds a whole state to a new Compiler (what an agent does on start).
func CompileIncremental(st State) (*Compiler, *Desired, error) {
	c := NewCompiler(st.NodeAddrs)
	for i := range st.Namespaces {
		c.SetNamespace(&st.Namespaces[i])
	}
	for i := range st.Pods {
		c.SetPod(&st.Pods[i])
	}
	for i := range st.Policies {
		c.SetPolicy(&st.Policies[i])
	}
	d, err := c.Desired()
	return c, d, err
}

// SetNamespace adds or updates a namespace (its labels).
func (c *Compiler) SetNamespace(ns *corev1.Namespace) {
	l := NamespaceLabels(ns.Name, ns.Labels)
	if old, ok := c.nsLabels[ns.Name]; ok && maps.Equal(old, l) {
		return
	}
	c.nsLabels[ns.Name] = l
	c.reshapeNamespace(ns.Name)
}

// DeleteNamespace forgets a namespace's labels (its pods keep kubernetes.io/metadata.name).
func (c *Compiler) DeleteNamespace(name string) {
	if _, ok := c.nsLabels[name]; !ok {
		return
	}
	delete(c.nsLabels, name)
	c.reshapeNamespace(name)
}

// reshapeNamespace moves every pod of the namespace to its new shape. Pods are kept as
// their shape plus addresses; the shape's description carries the labels and ports.
func (c *Compiler) reshapeNamespace(name string) {
	nl := c.namespaceLabels(name)
	for nn, pe := range c.pods {
		if nn.Namespace != name {
			continue
		}
		old := c.shapes[pe.shape]
		s := old.shape
		s.NSLabels = nl
		c.movePod(nn, pe, s)
	}
}

func (c *Compiler) namespaceLabels(name string) map[string]string {
	if l, ok := c.nsLabels[name]; ok {
		return l
	}
	return NamespaceLabels(name, nil)
}

// SetPod adds or updates a pod. The caller leaves out host-network and finished pods, as
// for Compile.
func (c *Compiler) SetPod(p *corev1.Pod) {
	nn := types.NamespacedName{Namespace: p.Namespace, Name: p.Name}
	s := podShape{Namespace: p.Namespace, NSLabels: c.namespaceLabels(p.Namespace), Labels: maps.Clone(p.Labels), NamedPorts: PodNamedPorts(p)}
	pe := c.pods[nn]
	if pe == nil {
		pe = &podEntry{}
		c.pods[nn] = pe
	}
	c.setAddrs(nn, pe, nil)
	c.movePod(nn, pe, s)
	c.setAddrs(nn, pe, PodAddrs(p))
}

// DeletePod forgets a pod.
func (c *Compiler) DeletePod(nn types.NamespacedName) {
	pe := c.pods[nn]
	if pe == nil {
		return
	}
	c.setAddrs(nn, pe, nil)
	c.leaveShape(pe.shape)
	delete(c.pods, nn)
	delete(c.d.PodIdentity, nn)
}

func (c *Compiler) setAddrs(nn types.NamespacedName, pe *podEntry, addrs []netip.Addr) {
	for _, a := range pe.addrs {
		o := slices.DeleteFunc(c.owners4[a], func(x types.NamespacedName) bool { return x == nn })
		if len(o) == 0 {
			delete(c.owners4, a)
			delete(c.d.IPCache, a)
			continue
		}
		c.owners4[a] = o
		c.d.IPCache[a] = c.d.PodIdentity[o[len(o)-1]]
	}
	pe.addrs = addrs
	if pe.shape == "" {
		return
	}
	id := c.shapes[pe.shape].id
	for _, a := range addrs {
		c.owners4[a] = append(c.owners4[a], nn)
		c.d.IPCache[a] = id
	}
}

// movePod puts a pod in shape s (a no-op when it is its shape already).
func (c *Compiler) movePod(nn types.NamespacedName, pe *podEntry, s podShape) {
	canon := s.canonical()
	if canon == pe.shape {
		return
	}
	si := c.shapes[canon]
	if si == nil {
		si = &shapeInfo{shape: s}
		off := hash32(canon) % uint32(cidrIdentityBit-minPodIdentity)
		for c.taken[minPodIdentity+Identity(off)] {
			off = (off + 1) % uint32(cidrIdentityBit-minPodIdentity)
		}
		si.id = minPodIdentity + Identity(off)
		c.taken[si.id] = true
		c.shapes[canon] = si
		c.byID[si.id] = si
		i, _ := slices.BinarySearchFunc(c.order, si.id, func(a *shapeInfo, id Identity) int { return cmp.Compare(a.id, id) })
		c.order = slices.Insert(c.order, i, si)
		c.d.Shapes[si.id] = canon
		c.d.Namespace[si.id] = s.Namespace
		c.shapeAdded(si)
	}
	si.pods = append(si.pods, nn)
	if pe.shape != "" {
		c.leaveShape(pe.shape)
	}
	pe.shape = canon
	c.d.PodIdentity[nn] = si.id
	for _, a := range pe.addrs {
		c.d.IPCache[a] = si.id
	}
}

func (c *Compiler) leaveShape(canon string) {
	si := c.shapes[canon]
	if si == nil {
		return
	}
	si.pods = si.pods[:len(si.pods)-1] // used as a count here: which names is not needed
	if len(si.pods) == 0 {
		c.removeShape(canon, si)
	}
}

func (c *Compiler) removeShape(canon string, si *shapeInfo) {
	delete(c.shapes, canon)
	delete(c.byID, si.id)
	delete(c.taken, si.id)
	delete(c.d.Shapes, si.id)
	delete(c.d.Namespace, si.id)
	i, ok := slices.BinarySearchFunc(c.order, si.id, func(a *shapeInfo, id Identity) int { return cmp.Compare(a.id, id) })
	if ok {
		c.order = slices.Delete(c.order, i, i+1)
	}
	for nn, pe := range c.policies {
		if pe.contrib == nil || pe.contrib.refs[si.id] || pe.contrib.anyNamed {
			c.dirty[nn] = true
		}
	}
}

func (c *Compiler) shapeAdded(si *shapeInfo) {
	for nn, pe := range c.policies {
		if c.dirty[nn] {
			continue
		}
		if pe.sel == nil || pe.contrib == nil || pe.contrib.anyNamed || pe.sel.matches(pe.np.Namespace, &si.shape) {
			c.dirty[nn] = true
		}
	}
}

// matches tells whether a shape is selected by the policy's podSelector or by some peer.
func (ps *policySelectors) matches(policyNS string, s *podShape) bool {
	if s.Namespace == policyNS && ps.pod.Matches(labels.Set(s.Labels)) {
		return true
	}
	for _, p := range ps.peers {
		if p.ns == nil {
			if s.Namespace != policyNS {
				continue
			}
		} else if !p.ns.Matches(labels.Set(s.NSLabels)) {
			continue
		}
		if p.pod == nil || p.pod.Matches(labels.Set(s.Labels)) {
			return true
		}
	}
	return false
}

func parseSelectors(np *networkingv1.NetworkPolicy) *policySelectors {
	pod, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
	if err != nil {
		return nil
	}
	ps := &policySelectors{pod: pod}
	ok := true
	forEachPeer(np, func(_ string, p *networkingv1.NetworkPolicyPeer) {
		if p.IPBlock != nil {
			return
		}
		var s peerSelector
		var err error
		if p.PodSelector != nil {
			if s.pod, err = metav1.LabelSelectorAsSelector(p.PodSelector); err != nil {
				ok = false
			}
		}
		if p.NamespaceSelector != nil {
			if s.ns, err = metav1.LabelSelectorAsSelector(p.NamespaceSelector); err != nil {
				ok = false
			}
		}
		ps.peers = append(ps.peers, s)
	})
	if !ok {
		return nil
	}
	return ps
}

// SetPolicy adds or updates a policy.
func (c *Compiler) SetPolicy(np *networkingv1.NetworkPolicy) {
	nn := types.NamespacedName{Namespace: np.Namespace, Name: np.Name}
	pe := c.policies[nn]
	if pe == nil {
		pe = &policyEntry{slot: c.freeSlot(nn.String())}
		c.policies[nn] = pe
	} else {
		c.unmerge(pe)
		c.dropPrefixes(pe)
	}
	pe.np = np.DeepCopy()
	pe.sel = parseSelectors(pe.np)
	pe.prefixes, pe.errs = policyPrefixes(pe.np)
	pe.blocks = namedPortBlocks(pe.np)
	for _, p := range pe.prefixes {
		if c.prefixes[p] == 0 {
			c.cidrsSet = true
		}
		c.prefixes[p]++
	}
	c.dirty[nn] = true
}

// DeletePolicy forgets a policy.
func (c *Compiler) DeletePolicy(nn types.NamespacedName) {
	pe := c.policies[nn]
	if pe == nil {
		return
	}
	c.unmerge(pe)
	c.dropPrefixes(pe)
	c.slots[pe.slot] = ""
	c.d.Policies[pe.slot] = ""
	delete(c.policies, nn)
	delete(c.dirty, nn)
}

func (c *Compiler) dropPrefixes(pe *policyEntry) {
	for _, p := range pe.prefixes {
		c.prefixes[p]--
		if c.prefixes[p] == 0 {
			delete(c.prefixes, p)
			c.cidrsSet = true
		}
	}
	pe.prefixes = nil
}

// ReserveSlots keeps the slots of prev (a previous Desired.Policies, "" free) for their
// policies: a policy set later gets its old slot back, other new policies take other
// free slots. A restarted agent passes what tern_policy_names held, so per-policy counters
// stay with their policies (policymap.Names). Call it before the first SetPolicy.
func (c *Compiler) ReserveSlots(prev []string) {
	c.reserved, c.reservedSlot = map[string]uint32{}, map[uint32]bool{}
	for i, n := range prev {
		if n != "" {
			c.reserved[n] = uint32(i)
			c.reservedSlot[uint32(i)] = true
		}
	}
}

// DropReservations frees the reserved slots no policy claimed (their policies were deleted
// while no agent ran). Call it once the first full state has been set.
func (c *Compiler) DropReservations() { c.reserved, c.reservedSlot = nil, nil }

func (c *Compiler) freeSlot(name string) uint32 {
	if i, ok := c.reserved[name]; ok {
		delete(c.reserved, name)
		delete(c.reservedSlot, i)
		for uint32(len(c.slots)) <= i {
			c.slots = append(c.slots, "")
			c.d.Policies = append(c.d.Policies, "")
		}
		if c.slots[i] == "" {
			c.slots[i] = name
			c.d.Policies[i] = name
			return i
		}
	}
	for i, n := range c.slots {
		if n == "" && !c.reservedSlot[uint32(i)] {
			c.slots[i] = name
			c.d.Policies[i] = name
			return uint32(i)
		}
	}
	c.slots = append(c.slots, name)
	c.d.Policies = append(c.d.Policies, name)
	return uint32(len(c.slots) - 1)
}

// unmerge takes a policy's contribution out of the maps.
func (c *Compiler) unmerge(pe *policyEntry) {
	if pe.contrib == nil {
		return
	}
	for id, f := range pe.contrib.iso {
		c.touched[id] = true
		n := c.isoCount[id]
		if f&IsolatedIngress != 0 {
			n[0]--
		}
		if f&IsolatedEgress != 0 {
			n[1]--
		}
		c.setIso(id, n)
		c.isolatedBy(id, f, pe.slot, false)
	}
	for _, id := range pe.contrib.subjects {
		c.selecting(id, pe.slot, false)
	}
	for k := range pe.contrib.rules {
		c.touched[k.Subject] = true
		o := c.owners[k]
		o = slices.DeleteFunc(o, func(s uint32) bool { return s == pe.slot })
		if len(o) == 0 {
			delete(c.owners, k)
			delete(c.d.Rules, k)
			if bs := c.bySubject[k.Subject]; bs != nil {
				delete(bs, k)
				if len(bs) == 0 {
					delete(c.bySubject, k.Subject)
				}
			}
			continue
		}
		c.owners[k] = o
		c.d.Rules[k] = c.first(o)
	}
	pe.contrib = nil
}

func (c *Compiler) merge(pe *policyEntry) {
	for id, f := range pe.contrib.iso {
		c.touched[id] = true
		n := c.isoCount[id]
		if n == nil {
			n = &[2]int{}
			c.isoCount[id] = n
		}
		if f&IsolatedIngress != 0 {
			n[0]++
		}
		if f&IsolatedEgress != 0 {
			n[1]++
		}
		c.setIso(id, n)
		c.isolatedBy(id, f, pe.slot, true)
	}
	for _, id := range pe.contrib.subjects {
		c.selecting(id, pe.slot, true)
	}
	for k := range pe.contrib.rules {
		c.touched[k.Subject] = true
		o := append(c.owners[k], pe.slot)
		c.owners[k] = o
		c.d.Rules[k] = c.first(o)
		if len(o) == 1 {
			bs := c.bySubject[k.Subject]
			if bs == nil {
				bs = map[RuleKey]struct{}{}
				c.bySubject[k.Subject] = bs
			}
			bs[k] = struct{}{}
		}
	}
}

func (c *Compiler) setIso(id Identity, n *[2]int) {
	var f uint32
	if n[0] > 0 {
		f |= IsolatedIngress
	}
	if n[1] > 0 {
		f |= IsolatedEgress
	}
	if f == 0 {
		delete(c.d.Isolation, id)
		delete(c.isoCount, id)
		return
	}
	c.d.Isolation[id] = f
}

// isolatedBy adds (or removes) slot to the policies isolating id in the directions of
// flags, and keeps Desired.IsolatedBy naming the first in namespace/name order.
func (c *Compiler) isolatedBy(id Identity, flags uint32, slot uint32, add bool) {
	for _, dir := range []Direction{Ingress, Egress} {
		if flags&dir.isolatedFlag() == 0 {
			continue
		}
		k := IsolationKey{Subject: id, Dir: dir}
		o := c.isoOwners[k]
		if add {
			o = append(o, slot)
		} else {
			o = slices.DeleteFunc(o, func(s uint32) bool { return s == slot })
		}
		if len(o) == 0 {
			delete(c.isoOwners, k)
			delete(c.d.IsolatedBy, k)
			continue
		}
		c.isoOwners[k] = o
		c.d.IsolatedBy[k] = c.first(o)
	}
}

// selecting adds (or removes) slot to the policies selecting id; Desired.Selecting lists
// them in namespace/name order, as Compile does.
func (c *Compiler) selecting(id Identity, slot uint32, add bool) {
	o := slices.Clone(c.selOwners[id])
	if add {
		o = append(o, slot)
	} else {
		o = slices.DeleteFunc(o, func(s uint32) bool { return s == slot })
	}
	if len(o) == 0 {
		delete(c.selOwners, id)
		delete(c.d.Selecting, id)
		return
	}
	slices.SortFunc(o, func(a, b uint32) int { return strings.Compare(c.slots[a], c.slots[b]) })
	c.selOwners[id] = o
	c.d.Selecting[id] = o
}

// first is the slot of the producing policy first in namespace/name order.
func (c *Compiler) first(slots []uint32) uint32 {
	best := slots[0]
	for _, s := range slots[1:] {
		if c.slots[s] < c.slots[best] {
			best = s
		}
	}
	return best
}

// Desired recompiles what the changes since the last call affect and returns the maps'
// contents with every invalid field of every policy, as Compile does.
func (c *Compiler) Desired() (*Desired, error) {
	// The prefixes are the policies' ipBlocks plus, for an egress named port on an ipBlock
	// peer, the /32 of every pod inside the block that has the name (as Compile): those
	// follow the pods, so they are found again on every call.
	all := maps.Clone(c.prefixes)
	for _, pe := range c.policies {
		if len(pe.blocks) == 0 {
			continue
		}
		for _, p := range namedBlockPodPrefixes(pe.blocks, c.d.IPCache, c.namedPortsOf) {
			all[p]++
		}
	}
	// A /32 that is a pod's address resolves named ports on that pod: a change of the
	// pod there changes the rules too.
	podPfx := map[netip.Prefix]Identity{}
	for p := range all {
		if id, ok := c.d.IPCache[p.Addr()]; ok && p.Bits() == 32 {
			podPfx[p] = id
		}
	}
	if c.cidrCapacity > 0 {
		n := len(all)
		for _, a := range c.nodeAddr {
			if all[netip.PrefixFrom(a, a.BitLen())] == 0 {
				n++
			}
		}
		if n > c.cidrCapacity {
			c.recompiled = 0
			return c.d, &CIDROverflowError{Prefixes: n, Capacity: c.cidrCapacity}
		}
	}
	if !c.cidrsSet && (len(all) != len(c.allocated) || !maps.Equal(podPfx, c.podPfx)) {
		c.cidrsSet = true
	}
	if !c.cidrsSet {
		for p := range all {
			if !c.allocated[p] {
				c.cidrsSet = true
				break
			}
		}
	}
	if c.cidrsSet {
		c.cidrsSet = false
		c.podPfx = podPfx
		c.allocated = make(map[netip.Prefix]bool, len(all))
		for p := range all {
			c.allocated[p] = true
		}
		descs := make([]string, 0, len(all))
		for p := range all {
			descs = append(descs, p.String())
		}
		ids := allocate(descs, cidrIdentityBit, cidrIdentityBit|(cidrIdentityBit-1))
		clear(c.d.CIDRs)
		for p := range all {
			c.d.CIDRs[p] = ids[p.String()]
		}
		c.podPrefix = podPrefixes(c.d.CIDRs, c.d.IPCache)
		for _, a := range c.nodeAddr {
			c.d.CIDRs[netip.PrefixFrom(a, a.BitLen())] = IdentityHost
		}
		c.index = newCIDRIndex(c.d.CIDRs)
		for nn, pe := range c.policies {
			if pe.contrib == nil || pe.contrib.usesCIDR {
				c.dirty[nn] = true
			}
		}
	}
	c.recompiled = len(c.dirty)
	for nn := range c.dirty {
		pe := c.policies[nn]
		c.unmerge(pe)
		pe.contrib = newContribution(c.index, c.podPrefix, c.d.IPCache)
		var errs []error
		if err := pe.contrib.compilePolicy(pe.np, c.order); err != nil {
			errs = append(errs, err)
		}
		pe.errs = append(pe.errs[:0:0], errs...)
		if perrs := c.prefixErrs(pe); len(perrs) > 0 {
			pe.errs = append(perrs, pe.errs...)
		}
		c.merge(pe)
		delete(c.dirty, nn)
	}
	names := slices.Collect(maps.Keys(c.policies))
	slices.SortFunc(names, func(a, b types.NamespacedName) int { return strings.Compare(a.String(), b.String()) })
	var errs []error
	for _, nn := range names {
		errs = append(errs, c.policies[nn].errs...)
	}
	return c.d, errors.Join(errs...)
}

// namedPortsOf is the named ports of a pod identity (nil: none or no such identity).
func (c *Compiler) namedPortsOf(id Identity) map[string]NamedPort {
	if si := c.byID[id]; si != nil {
		return si.shape.NamedPorts
	}
	return nil
}

func (c *Compiler) prefixErrs(pe *policyEntry) []error {
	_, errs := policyPrefixes(pe.np)
	return errs
}
