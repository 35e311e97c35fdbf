// Package policy compiles Kubernetes NetworkPolicies into what the datapath's policy maps
// must hold (bpf/lib/policy.h): identities for pod shapes and ipBlock prefixes, the
// address -> identity entries, which identities are isolated in which direction, and the
// allow rules keyed by (subject identity, peer identity, direction, protocol, port prefix).
//
// The compiler is a pure function of plain values (k8s.io/api objects in, Go maps out); the
// agent's reconcilers diff its output against the kernel maps, and the simulator
// (policy/simulate) loads it into private maps. policy/reference is an independent,
// straightforward evaluator of the same semantics, which the tests compare against.
package policy

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
)

// State is the cluster as the compiler sees it.
type State struct {
	Namespaces []corev1.Namespace
	Pods       []corev1.Pod
	Policies   []networkingv1.NetworkPolicy
	// NodeAddrs are the local node's addresses: traffic between a pod and them is always
	// allowed (IdentityHost).
	NodeAddrs []netip.Addr
}

// Direction matches enum policy_dir in bpf/lib/policy.h.
type Direction uint8

const (
	Ingress Direction = 1
	Egress  Direction = 2
)

func (d Direction) String() string {
	if d == Ingress {
		return "ingress"
	}
	return "egress"
}

// Isolation flags, matching enum policy_iso_flag in bpf/lib/policy.h.
const (
	IsolatedIngress uint32 = 1 << 0
	IsolatedEgress  uint32 = 1 << 1
	// Audit: would-drop verdicts are counted and passed, not enforced. The compiler never
	// sets it; the agent adds it from its configuration.
	Audit uint32 = 1 << 2
)

// RuleKey is one allow entry. The datapath matches it as a prefix of
// (subject, peer, dir, proto, port): Proto 0 means any protocol and any port; otherwise the
// high PortBits bits of Port must match (16: one port, 0: any port of Proto).
type RuleKey struct {
	Subject  Identity
	Peer     Identity
	Dir      Direction
	Proto    uint8
	Port     uint16
	PortBits uint8
}

// Covers tells whether the entry allows (proto, port).
func (k RuleKey) Covers(proto uint8, port uint16) bool {
	if k.Proto == 0 {
		return true
	}
	if k.Proto != proto {
		return false
	}
	mask := uint16(0xffff) << (16 - uint(k.PortBits))
	if k.PortBits == 0 {
		mask = 0
	}
	return port&mask == k.Port&mask
}

// IsolationKey is an identity isolated in one direction.
type IsolationKey struct {
	Subject Identity
	Dir     Direction
}

// Desired is what the policy maps must hold.
type Desired struct {
	// Shapes describes every pod identity (for ternctl and errors).
	Shapes map[Identity]string
	// Namespace is each pod identity's namespace (audit mode is per namespace).
	Namespace map[Identity]string
	// PodIdentity is each pod's identity by namespace/name.
	PodIdentity map[types.NamespacedName]Identity
	// IPCache maps pod addresses to their identity (tern_ipcache, prefix /32).
	IPCache map[netip.Addr]Identity
	// CIDRs maps ipBlock prefixes (cidr and except) to their identity, and the node's
	// addresses to IdentityHost (tern_policy_cidrs).
	CIDRs map[netip.Prefix]Identity
	// Isolation holds the flags of every identity some policy selects (tern_policy_isolation).
	Isolation map[Identity]uint32
	// IsolatedBy is, per identity and direction it is isolated in, the index in Policies
	// of the first policy isolating it: the one a denial is attributed to.
	IsolatedBy map[IsolationKey]uint32
	// Selecting lists, per identity, the indexes in Policies of every policy selecting it.
	Selecting map[Identity][]uint32
	// Rules are the allow entries (tern_policy); the value is the index in Policies of the
	// first policy that produced the entry.
	Rules map[RuleKey]uint32
	// Policies names the policies by index, "namespace/name".
	Policies []string
}

// namedPorts is the named-port table of the pod identity id.
func namedPorts(order []*shapeInfo, id Identity) map[string]NamedPort {
	i, ok := slices.BinarySearchFunc(order, id, func(s *shapeInfo, id Identity) int { return cmp.Compare(s.id, id) })
	if !ok {
		return nil
	}
	return order[i].shape.NamedPorts
}

type shapeInfo struct {
	id    Identity
	shape podShape
	pods  []types.NamespacedName
}

// compiled peer of one rule.
type peerSet struct {
	any bool
	ids []Identity // pod and CIDR identities
	set map[Identity]bool
}

// Compile turns st into map contents. It reports every invalid object at once, each named
// with the field at fault; the contents it returns with them are still safe to apply: an
// invalid peer or port allows nothing, and the policy still isolates the pods it selects.
func Compile(st State) (*Desired, error) {
	d := &Desired{
		Shapes:      map[Identity]string{},
		Namespace:   map[Identity]string{},
		PodIdentity: map[types.NamespacedName]Identity{},
		IPCache:     map[netip.Addr]Identity{},
		CIDRs:       map[netip.Prefix]Identity{},
		Isolation:   map[Identity]uint32{},
		IsolatedBy:  map[IsolationKey]uint32{},
		Selecting:   map[Identity][]uint32{},
		Rules:       map[RuleKey]uint32{},
	}
	var errs []error

	nsLabels := map[string]map[string]string{}
	for _, ns := range st.Namespaces {
		nsLabels[ns.Name] = NamespaceLabels(ns.Name, ns.Labels)
	}

	// Pod shapes and identities.
	shapes := map[string]*shapeInfo{}
	podShapeOf := map[types.NamespacedName]string{}
	for i := range st.Pods {
		p := &st.Pods[i]
		nl, ok := nsLabels[p.Namespace]
		if !ok {
			nl = NamespaceLabels(p.Namespace, nil)
		}
		s := podShape{Namespace: p.Namespace, NSLabels: nl, Labels: p.Labels, NamedPorts: PodNamedPorts(p)}
		c := s.canonical()
		si := shapes[c]
		if si == nil {
			si = &shapeInfo{shape: s}
			shapes[c] = si
		}
		nn := types.NamespacedName{Namespace: p.Namespace, Name: p.Name}
		si.pods = append(si.pods, nn)
		podShapeOf[nn] = c
	}
	descs := make([]string, 0, len(shapes))
	for c := range shapes {
		descs = append(descs, c)
	}
	ids := allocate(descs, minPodIdentity, cidrIdentityBit)
	order := make([]*shapeInfo, 0, len(shapes))
	for c, si := range shapes {
		si.id = ids[c]
		d.Shapes[si.id] = c
		d.Namespace[si.id] = si.shape.Namespace
		order = append(order, si)
	}
	slices.SortFunc(order, func(a, b *shapeInfo) int { return cmp.Compare(a.id, b.id) })
	namedPortsOf := make(map[Identity]map[string]NamedPort, len(order))
	for _, si := range order {
		namedPortsOf[si.id] = si.shape.NamedPorts
	}
	for i := range st.Pods {
		p := &st.Pods[i]
		nn := types.NamespacedName{Namespace: p.Namespace, Name: p.Name}
		id := ids[podShapeOf[nn]]
		d.PodIdentity[nn] = id
		for _, a := range PodAddrs(p) {
			d.IPCache[a] = id
		}
	}

	// ipBlock prefixes first: a rule's ipBlock selects every prefix inside it.
	var prefixes []netip.Prefix
	for i := range st.Policies {
		ps, perrs := policyPrefixes(&st.Policies[i])
		prefixes = append(prefixes, ps...)
		errs = append(errs, perrs...)
	}
	// An egress rule with a named port and an ipBlock peer: the name resolves on each
	// destination pod inside the block (an address that is no pod has no named ports), so
	// every such pod's address becomes a /32 prefix of its own, which gets the enclosing
	// blocks' rules like any nested prefix plus its resolved port (addRule).
	for i := range st.Policies {
		prefixes = append(prefixes, namedBlockPodPrefixes(namedPortBlocks(&st.Policies[i]), d.IPCache,
			func(id Identity) map[string]NamedPort { return namedPortsOf[id] })...)
	}
	pdescs := make([]string, 0, len(prefixes))
	for _, p := range prefixes {
		pdescs = append(pdescs, p.String())
	}
	pids := allocate(pdescs, cidrIdentityBit, cidrIdentityBit|(cidrIdentityBit-1))
	for _, p := range prefixes {
		d.CIDRs[p] = pids[p.String()]
	}
	podPrefix := podPrefixes(d.CIDRs, d.IPCache)
	for _, a := range st.NodeAddrs {
		d.CIDRs[netip.PrefixFrom(a, a.BitLen())] = IdentityHost
	}

	index := newCIDRIndex(d.CIDRs)
	for i := range st.Policies {
		np := &st.Policies[i]
		d.Policies = append(d.Policies, np.Namespace+"/"+np.Name)
		c := newContribution(index, podPrefix, d.IPCache)
		if err := c.compilePolicy(np, order); err != nil {
			errs = append(errs, err)
		}
		c.mergeInto(d, uint32(i))
	}
	return d, errors.Join(errs...)
}

// namedBlock is an egress rule's ipBlock peer with the port names the rule lists.
type namedBlock struct {
	cidr  netip.Prefix
	names []string
}

// namedPortBlocks is np's egress ipBlock peers whose rule has a named port.
func namedPortBlocks(np *networkingv1.NetworkPolicy) []namedBlock {
	var out []namedBlock
	for _, r := range np.Spec.Egress {
		var names []string
		for _, port := range r.Ports {
			if port.Port != nil && port.Port.Type != 0 && !slices.Contains(names, port.Port.StrVal) {
				names = append(names, port.Port.StrVal)
			}
		}
		if len(names) == 0 {
			continue
		}
		for _, peer := range r.To {
			if peer.IPBlock == nil {
				continue
			}
			c, err := netip.ParsePrefix(peer.IPBlock.CIDR)
			if err != nil || !c.Addr().Is4() {
				continue
			}
			out = append(out, namedBlock{cidr: c.Masked(), names: names})
		}
	}
	return out
}

// namedBlockPodPrefixes is the /32 of every pod address inside one of blocks whose pod has
// one of the block's port names.
func namedBlockPodPrefixes(blocks []namedBlock, ipcache map[netip.Addr]Identity,
	portsOf func(Identity) map[string]NamedPort) []netip.Prefix {
	var out []netip.Prefix
	for _, b := range blocks {
		for a, id := range ipcache {
			if !b.cidr.Contains(a) {
				continue
			}
			ports := portsOf(id)
			for _, n := range b.names {
				if _, ok := ports[n]; ok {
					out = append(out, netip.PrefixFrom(a, 32))
					break
				}
			}
		}
	}
	return out
}

// podPrefixes is the /32 ipBlock prefixes that are pod addresses, by their CIDR identity.
func podPrefixes(cidrs map[netip.Prefix]Identity, ipcache map[netip.Addr]Identity) map[Identity]netip.Prefix {
	out := map[Identity]netip.Prefix{}
	for p, id := range cidrs {
		if _, ok := ipcache[p.Addr()]; ok && p.Bits() == 32 && id != IdentityHost {
			out[id] = p
		}
	}
	return out
}

// policyPrefixes is the IPv4 ipBlock prefixes (cidr and except) of np, and the fields that
// do not parse.
func policyPrefixes(np *networkingv1.NetworkPolicy) ([]netip.Prefix, []error) {
	var prefixes []netip.Prefix
	var errs []error
	forEachPeer(np, func(field string, peer *networkingv1.NetworkPolicyPeer) {
		if peer.IPBlock == nil {
			return
		}
		// An IPv6 prefix is valid but holds no IPv4 address: it matches nothing here
		// (the datapath is IPv4) and needs no entry.
		c, err := netip.ParsePrefix(peer.IPBlock.CIDR)
		if err != nil {
			errs = append(errs, fmt.Errorf("networkpolicy %s/%s: %s.ipBlock.cidr %q is not a CIDR: %w",
				np.Namespace, np.Name, field, peer.IPBlock.CIDR, err))
			return
		}
		if c.Addr().Is4() {
			prefixes = append(prefixes, c.Masked())
		}
		for j, e := range peer.IPBlock.Except {
			x, err := netip.ParsePrefix(e)
			if err != nil {
				errs = append(errs, fmt.Errorf("networkpolicy %s/%s: %s.ipBlock.except[%d] %q is not a CIDR: %w",
					np.Namespace, np.Name, field, j, e, err))
				continue
			}
			if x.Addr().Is4() {
				prefixes = append(prefixes, x.Masked())
			}
		}
	})
	return prefixes, errs
}

// contribution is what one policy adds to the maps, compiled against a set of pod shapes
// and ipBlock identities. The whole compiler merges every policy's; the incremental one
// (Compiler) keeps each policy's so it can take it out again.
type contribution struct {
	cidrs *cidrIndex // the ipBlock prefixes' identities (shared by every contribution of a compile)
	iso   map[Identity]uint32
	rules map[RuleKey]struct{}
	// What the result depends on besides the policy itself: the pod identities it selected
	// or named (refs), the ipBlock identities (usesCIDR), and every pod identity with a
	// named port (anyNamed: an egress named port towards any peer).
	refs     map[Identity]bool
	usesCIDR bool
	anyNamed bool
	// subjects are the pod identities the policy selects (Desired.Selecting).
	subjects []Identity
	// podPrefix and ipcache (read only): the ipBlock /32 prefixes that are pod addresses
	// and the pods' identities, to resolve an egress named port on an ipBlock peer.
	podPrefix map[Identity]netip.Prefix
	ipcache   map[netip.Addr]Identity
}

func newContribution(cidrs *cidrIndex, podPrefix map[Identity]netip.Prefix, ipcache map[netip.Addr]Identity) *contribution {
	return &contribution{cidrs: cidrs, iso: map[Identity]uint32{}, rules: map[RuleKey]struct{}{}, refs: map[Identity]bool{},
		podPrefix: podPrefix, ipcache: ipcache}
}

func (c *contribution) put(k RuleKey) { c.rules[k] = struct{}{} }

// mergeInto adds c to d as the policy with index idx (lower indexes win a rule's value).
func (c *contribution) mergeInto(d *Desired, idx uint32) {
	for id, f := range c.iso {
		d.Isolation[id] |= f
		for _, dir := range []Direction{Ingress, Egress} {
			if f&dir.isolatedFlag() == 0 {
				continue
			}
			k := IsolationKey{Subject: id, Dir: dir}
			if old, ok := d.IsolatedBy[k]; !ok || idx < old {
				d.IsolatedBy[k] = idx
			}
		}
	}
	for _, id := range c.subjects {
		d.Selecting[id] = append(d.Selecting[id], idx)
	}
	for k := range c.rules {
		d.put(k, idx)
	}
}

// isolatedFlag is the Isolation flag of the direction.
func (dir Direction) isolatedFlag() uint32 {
	if dir == Ingress {
		return IsolatedIngress
	}
	return IsolatedEgress
}

// NamespaceLabels returns a namespace's labels with kubernetes.io/metadata.name set, as
// the apiserver does.
func NamespaceLabels(name string, l map[string]string) map[string]string {
	out := make(map[string]string, len(l)+1)
	for k, v := range l {
		out[k] = v
	}
	out[metadataNameLabel] = name
	return out
}

// PodNamedPorts is a pod's named container ports (protocol defaults to TCP).
func PodNamedPorts(p *corev1.Pod) map[string]NamedPort {
	out := map[string]NamedPort{}
	for _, c := range p.Spec.Containers {
		for _, cp := range c.Ports {
			if cp.Name == "" {
				continue
			}
			proto := cp.Protocol
			if proto == "" {
				proto = corev1.ProtocolTCP
			}
			out[cp.Name] = NamedPort{Protocol: proto, Port: uint16(cp.ContainerPort)}
		}
	}
	return out
}

// PodAddrs are a pod's IPv4 addresses from its status.
func PodAddrs(p *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	seen := map[netip.Addr]bool{}
	add := func(s string) {
		a, err := netip.ParseAddr(s)
		if err == nil && a.Is4() && !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	add(p.Status.PodIP)
	for _, ip := range p.Status.PodIPs {
		add(ip.IP)
	}
	return out
}

// PolicyTypes returns the policy's types as the apiserver defaults them: Ingress always,
// Egress when there are egress rules, unless policyTypes says otherwise.
func PolicyTypes(np *networkingv1.NetworkPolicy) (ingress, egress bool) {
	if len(np.Spec.PolicyTypes) == 0 {
		return true, len(np.Spec.Egress) > 0
	}
	for _, t := range np.Spec.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress:
			ingress = true
		case networkingv1.PolicyTypeEgress:
			egress = true
		}
	}
	return ingress, egress
}

func forEachPeer(np *networkingv1.NetworkPolicy, fn func(field string, p *networkingv1.NetworkPolicyPeer)) {
	for i := range np.Spec.Ingress {
		for j := range np.Spec.Ingress[i].From {
			fn(fmt.Sprintf("spec.ingress[%d].from[%d]", i, j), &np.Spec.Ingress[i].From[j])
		}
	}
	for i := range np.Spec.Egress {
		for j := range np.Spec.Egress[i].To {
			fn(fmt.Sprintf("spec.egress[%d].to[%d]", i, j), &np.Spec.Egress[i].To[j])
		}
	}
}

func selector(np *networkingv1.NetworkPolicy, field string, s *metav1.LabelSelector) (labels.Selector, error) {
	sel, err := metav1.LabelSelectorAsSelector(s)
	if err != nil {
		return nil, fmt.Errorf("networkpolicy %s/%s: %s: %w", np.Namespace, np.Name, field, err)
	}
	return sel, nil
}

func (c *contribution) compilePolicy(np *networkingv1.NetworkPolicy, order []*shapeInfo) error {
	podSel, err := selector(np, "spec.podSelector", &np.Spec.PodSelector)
	if err != nil {
		return err
	}
	var subjects []*shapeInfo
	for _, si := range order {
		if si.shape.Namespace == np.Namespace && podSel.Matches(labels.Set(si.shape.Labels)) {
			subjects = append(subjects, si)
		}
	}
	ing, eg := PolicyTypes(np)
	for _, s := range subjects {
		c.refs[s.id] = true
		c.subjects = append(c.subjects, s.id)
		if ing {
			c.iso[s.id] |= IsolatedIngress
		}
		if eg {
			c.iso[s.id] |= IsolatedEgress
		}
	}
	type rule struct {
		dir   Direction
		field string
		peers []networkingv1.NetworkPolicyPeer
		ports []networkingv1.NetworkPolicyPort
	}
	var rules []rule
	if ing {
		for i, r := range np.Spec.Ingress {
			rules = append(rules, rule{Ingress, fmt.Sprintf("spec.ingress[%d]", i), r.From, r.Ports})
		}
	}
	if eg {
		for i, r := range np.Spec.Egress {
			rules = append(rules, rule{Egress, fmt.Sprintf("spec.egress[%d]", i), r.To, r.Ports})
		}
	}
	for _, r := range rules {
		ps, err := c.peers(np, r.field, r.peers, order)
		if err != nil {
			return err
		}
		for _, s := range subjects {
			if err := c.addRule(np, r.field, s, r.dir, ps, r.ports, order); err != nil {
				return err
			}
		}
	}
	return nil
}

// peers resolves a rule's peers (OR across peers; selectors in one peer AND together).
func (c *contribution) peers(np *networkingv1.NetworkPolicy, field string, peers []networkingv1.NetworkPolicyPeer,
	order []*shapeInfo) (peerSet, error) {
	if len(peers) == 0 {
		return peerSet{any: true}, nil
	}
	seen := map[Identity]bool{}
	ps := peerSet{set: seen}
	add := func(id Identity) {
		if !seen[id] {
			seen[id] = true
			ps.ids = append(ps.ids, id)
		}
	}
	for j, p := range peers {
		pf := fmt.Sprintf("%s.peers[%d]", field, j)
		if p.IPBlock != nil {
			c.usesCIDR = true
			block, err := netip.ParsePrefix(p.IPBlock.CIDR)
			if err != nil {
				continue // reported by Compile
			}
			block = block.Masked()
			var excepts []netip.Prefix
			badExcept := false
			for _, e := range p.IPBlock.Except {
				x, err := netip.ParsePrefix(e)
				if err != nil {
					badExcept = true // reported by Compile; without it the block would allow too much
					break
				}
				excepts = append(excepts, x.Masked())
			}
			if badExcept {
				continue
			}
			c.cidrs.inside(block, excepts, add)
			continue
		}
		var podSel, nsSel labels.Selector
		var err error
		if p.PodSelector != nil {
			if podSel, err = selector(np, pf+".podSelector", p.PodSelector); err != nil {
				return ps, err
			}
		}
		if p.NamespaceSelector != nil {
			if nsSel, err = selector(np, pf+".namespaceSelector", p.NamespaceSelector); err != nil {
				return ps, err
			}
		}
		for _, si := range order {
			if nsSel == nil {
				if si.shape.Namespace != np.Namespace {
					continue
				}
			} else if !nsSel.Matches(labels.Set(si.shape.NSLabels)) {
				continue
			}
			if podSel != nil && !podSel.Matches(labels.Set(si.shape.Labels)) {
				continue
			}
			add(si.id)
			c.refs[si.id] = true
		}
	}
	slices.Sort(ps.ids)
	return ps, nil
}

func protoNumber(p *corev1.Protocol) (uint8, bool) {
	if p == nil {
		return 6, true
	}
	switch *p {
	case corev1.ProtocolTCP, "":
		return 6, true
	case corev1.ProtocolUDP:
		return 17, true
	case corev1.ProtocolSCTP:
		return 132, true
	}
	return 0, false
}

// ProtoNumber is the IP protocol number of a Kubernetes protocol name (0 if unknown).
func ProtoNumber(p corev1.Protocol) uint8 {
	n, _ := protoNumber(&p)
	return n
}

func (d *Desired) put(k RuleKey, idx uint32) {
	if old, ok := d.Rules[k]; !ok || idx < old {
		d.Rules[k] = idx
	}
}

func (c *contribution) addRule(np *networkingv1.NetworkPolicy, field string, s *shapeInfo, dir Direction,
	ps peerSet, ports []networkingv1.NetworkPolicyPort, order []*shapeInfo) error {
	peerIDs := ps.ids
	if ps.any {
		peerIDs = []Identity{IdentityAny}
	}
	if len(ports) == 0 {
		for _, p := range peerIDs {
			c.put(RuleKey{Subject: s.id, Peer: p, Dir: dir})
		}
		return nil
	}
	for i, port := range ports {
		pf := fmt.Sprintf("%s.ports[%d]", field, i)
		proto, ok := protoNumber(port.Protocol)
		if !ok {
			return fmt.Errorf("networkpolicy %s/%s: %s.protocol %q is not TCP, UDP or SCTP", np.Namespace, np.Name, pf, *port.Protocol)
		}
		protoName := corev1.ProtocolTCP
		if port.Protocol != nil && *port.Protocol != "" {
			protoName = *port.Protocol
		}
		if port.Port == nil {
			for _, p := range peerIDs {
				c.put(RuleKey{Subject: s.id, Peer: p, Dir: dir, Proto: proto})
			}
			continue
		}
		if port.Port.Type == 0 { // a number
			lo := port.Port.IntVal
			hi := lo
			if port.EndPort != nil {
				hi = *port.EndPort
			}
			if lo < 1 || lo > 65535 || hi < lo || hi > 65535 {
				return fmt.Errorf("networkpolicy %s/%s: %s: port %d endPort %d is not a valid range", np.Namespace, np.Name, pf, lo, hi)
			}
			for _, b := range PortBlocks(uint16(lo), uint16(hi)) {
				for _, p := range peerIDs {
					c.put(RuleKey{Subject: s.id, Peer: p, Dir: dir, Proto: proto, Port: b.Port, PortBits: b.Bits})
				}
			}
			continue
		}
		// A named port resolves on the destination pod: the subject for ingress, each peer
		// pod for egress (peers that are not pods have no named ports).
		name := port.Port.StrVal
		if dir == Ingress {
			if np, ok := s.shape.NamedPorts[name]; ok && np.Protocol == protoName {
				for _, p := range peerIDs {
					c.put(RuleKey{Subject: s.id, Peer: p, Dir: dir, Proto: proto, Port: np.Port, PortBits: 16})
				}
			}
			continue
		}
		if ps.any {
			c.anyNamed = true
		}
		for _, peer := range order {
			if !ps.any && !ps.set[peer.id] {
				continue
			}
			if np, ok := peer.shape.NamedPorts[name]; ok && np.Protocol == protoName {
				c.put(RuleKey{Subject: s.id, Peer: peer.id, Dir: dir, Proto: proto, Port: np.Port, PortBits: 16})
			}
		}
		// ipBlock peers: the /32 prefixes Compile made for the pods inside them.
		for _, id := range ps.ids {
			pfx, ok := c.podPrefix[id]
			if !ok {
				continue
			}
			if np, ok := namedPorts(order, c.ipcache[pfx.Addr()])[name]; ok && np.Protocol == protoName {
				c.put(RuleKey{Subject: s.id, Peer: id, Dir: dir, Proto: proto, Port: np.Port, PortBits: 16})
			}
		}
	}
	return nil
}

// PortBlock is an aligned block of ports: the high Bits bits of Port fixed.
type PortBlock struct {
	Port uint16
	Bits uint8
}

// PortBlocks splits [lo, hi] into the fewest aligned blocks (at most 30), so a range is a
// handful of prefix entries rather than one entry per port.
func PortBlocks(lo, hi uint16) []PortBlock {
	var out []PortBlock
	cur := uint32(lo)
	end := uint32(hi)
	for cur <= end {
		size := uint32(1)
		bits := uint8(16)
		for bits > 0 {
			next := size << 1
			if cur%next != 0 || cur+next-1 > end {
				break
			}
			size = next
			bits--
		}
		out = append(out, PortBlock{Port: uint16(cur), Bits: bits})
		cur += size
	}
	return out
}
