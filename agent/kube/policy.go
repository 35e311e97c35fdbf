package kube

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/agent/readiness"
	"github.com/tern-net/tern/endpoint"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policymap"
)

// policyReconciler keeps the datapath's NetworkPolicy state equal to the cluster's: it
// watches Pods (every node's: the ipcache needs every pod address), Namespaces and
// NetworkPolicies, compiles them (package policy) on every change, and writes
//   - the identities of this node's endpoints and their EP_F_POLICY flag (endpoint.Registry),
//   - the other pods' addresses and identities (the ipcache, through the registry's cache),
//   - tern_policy, tern_policy_isolation and tern_policy_cidrs (policymap.Writer), holding
//     the rules of the identities of pods scheduled to this node (spec.nodeName, known
//     before the pod's sandbox exists, so its rules are in place before its first packet).
//
// Compilation is incremental (policy.Compiler): each sync hands the compiler only the
// objects whose resourceVersion changed since the last one, and it recompiles only the
// policies those changes can affect; the writer then rewrites only the identities whose
// rules changed (or that became or stopped being local), and writes only entries that differ.
type policyReconciler struct {
	node    string
	enforce bool
	audit   func(namespace string) bool
	reg     *endpoint.Registry
	writer  *policymap.Writer
	names   *policymap.Names // tern_policy_names, owned by the sync loop
	maps    *loader.PolicyMaps
	log     *zap.Logger
	ready   *readiness.Component
	client  kubernetes.Interface

	pods, nss, nps cache.SharedIndexInformer
	trigger        chan struct{}
	remote         map[netip.Addr]bool // ipcache entries written for pods of other nodes
	nodeIPs        []netip.Addr        // this node's addresses, read once (always allowed)

	// failures counts syncs that could not write the maps; each also gives this Node a
	// Warning Event (recorder) so that an operator sees it where kubectl describe looks.
	failures *prometheus.CounterVec
	recorder record.EventRecorder

	compiler *policy.Compiler              // created by the first sync (it needs the node's addresses)
	seen     map[string]string             // "kind/namespace/name" -> resourceVersion fed to the compiler
	seenPods map[types.NamespacedName]bool // pods fed to the compiler (the others: host network, finished)
	// compilerHasNode: the compiler was made with this node's addresses.
	compilerHasNode bool
	// fullSynced: the maps hold a full sync's contents, later syncs may rewrite only some
	// identities (policymap.Writer.SyncSubjects); inMaps are the identities whose rules
	// the maps hold.
	fullSynced bool
	inMaps     map[policy.Identity]bool

	// compiled guards the compiler's state (its Desired) against View: the sync loop holds
	// it to change that state; View reads it, which the writers' reads do not disturb.
	compiled sync.RWMutex
	desired  *policy.Desired // the last compiled state (View), nil before the first sync

	mu     sync.Mutex
	lookup *identityLookup // the last compiled identities, read by the registry's PolicyFunc
	synced bool
}

// identityLookup is a copy of the compiled pod identities: the compiler updates its own
// maps in place during the next sync, while the registry may read these at any time.
type identityLookup struct {
	byPod  map[types.NamespacedName]policy.Identity
	byAddr map[netip.Addr]policy.Identity
}

func newPolicyReconciler(client kubernetes.Interface, node string, enforce bool, audit func(string) bool,
	reg *endpoint.Registry, maps *loader.PolicyMaps, ready *readiness.Component, recorder record.EventRecorder,
	registerer prometheus.Registerer, log *zap.Logger) (*policyReconciler, error) {
	w, err := policymap.NewWriter(maps)
	if err != nil {
		return nil, fmt.Errorf("networkpolicy: %w", err)
	}
	names, err := policymap.NewNames(maps)
	if err != nil {
		return nil, fmt.Errorf("networkpolicy: %w", err)
	}
	r := &policyReconciler{node: node, enforce: enforce, audit: audit, reg: reg, writer: w, names: names, maps: maps, log: log.Named("policy"),
		ready: ready, client: client, trigger: make(chan struct{}, 1), remote: map[netip.Addr]bool{}, recorder: recorder,
		seen: map[string]string{}, seenPods: map[types.NamespacedName]bool{},
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tern_networkpolicy_sync_failures_total",
			Help: "NetworkPolicy syncs that could not write the policy maps, by reason (map_full, other); the previous rules stay enforced."},
			[]string{"reason"})}
	for _, reason := range []string{"map_full", "other"} {
		r.failures.WithLabelValues(reason)
	}
	if registerer != nil {
		if err := registerer.Register(r.failures); err != nil {
			return nil, fmt.Errorf("networkpolicy: register metrics: %w", err)
		}
	}
	// Entries a previous agent wrote for other nodes' pods: the first sync removes the
	// ones whose pods left meanwhile.
	for _, a := range reg.Cache().PodAddrs() {
		r.remote[a] = true
	}
	factory := informers.NewSharedInformerFactory(client, 0)
	r.pods = factory.Core().V1().Pods().Informer()
	r.nss = factory.Core().V1().Namespaces().Informer()
	r.nps = factory.Networking().V1().NetworkPolicies().Informer()
	h := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { r.kick() },
		UpdateFunc: func(any, any) { r.kick() },
		DeleteFunc: func(any) { r.kick() },
	}
	for _, inf := range []cache.SharedIndexInformer{r.pods, r.nss, r.nps} {
		if _, err := inf.AddEventHandler(h); err != nil {
			return nil, fmt.Errorf("networkpolicy: watch: %w", err)
		}
	}
	return r, nil
}

// reportFailure counts a failed sync and says so on this Node. A policy map that is full
// (E2BIG from the kernel) keeps the rules it had: policymap.Writer adds new rules and
// prefixes before it changes isolation or deletes anything, so a write that stops part way
// enforces the previous policy (plus unused new entries).
func (r *policyReconciler) reportFailure(err error) {
	reason, event := "other", "TernNetworkPolicySyncFailed"
	// A full hash map answers E2BIG; a full LPM trie (tern_policy, tern_policy_cidrs) ENOSPC.
	if errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOSPC) || errors.Is(err, policy.ErrTooManyCIDRs) {
		reason, event = "map_full", "TernNetworkPolicyMapFull"
	}
	r.failures.WithLabelValues(reason).Inc()
	if r.recorder != nil {
		ref := &corev1.ObjectReference{Kind: "Node", APIVersion: "v1", Name: r.node, UID: types.UID(r.node)}
		r.recorder.Eventf(ref, corev1.EventTypeWarning, event,
			"could not write the NetworkPolicy rules on this node; the previous rules stay enforced until a change fits (will retry on the next change): %v", err)
	}
}

func (r *policyReconciler) kick() {
	select {
	case r.trigger <- struct{}{}:
	default:
	}
}

// run watches and reconciles until ctx ends. The readiness component turns ready after the
// first sync of the full lists is in the maps.
func (r *policyReconciler) run(ctx context.Context, wg *sync.WaitGroup) {
	for _, inf := range []cache.SharedIndexInformer{r.pods, r.nss, r.nps} {
		wg.Add(1)
		go func() { defer wg.Done(); inf.Run(ctx.Done()) }()
	}
	if !cache.WaitForCacheSync(ctx.Done(), r.pods.HasSynced, r.nss.HasSynced, r.nps.HasSynced) {
		return
	}
	r.kick()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.trigger:
		}
		start := time.Now()
		if err := r.sync(ctx); err != nil {
			// The next change retries; readiness says why until a sync succeeds.
			r.log.Error("networkpolicy sync failed", zap.Error(err))
			r.reportFailure(err)
			r.mu.Lock()
			synced := r.synced
			r.mu.Unlock()
			if !synced {
				r.ready.NotReady(err.Error())
			}
			continue
		}
		r.log.Debug("networkpolicy synced", zap.Duration("took", time.Since(start)))
		r.mu.Lock()
		r.synced = true
		r.mu.Unlock()
		r.ready.Ready()
	}
}

func (r *policyReconciler) nodeAddrs(ctx context.Context) []netip.Addr {
	if r.nodeIPs != nil {
		return r.nodeIPs
	}
	n, err := r.client.CoreV1().Nodes().Get(ctx, r.node, metav1.GetOptions{})
	if err != nil {
		r.log.Warn("cannot read this node's addresses: traffic to its InternalIP is judged as any other address",
			zap.String("node", r.node), zap.Error(err))
		return nil
	}
	var out []netip.Addr
	for _, a := range n.Status.Addresses {
		if ip, err := netip.ParseAddr(a.Address); err == nil && ip.Is4() {
			out = append(out, ip)
		}
	}
	// Read once: a node's addresses do not change under a running agent.
	r.nodeIPs = out
	return out
}

// feed hands the compiler the objects that changed since the last sync (by
// resourceVersion) and the deletions, and returns this node's pods.
func (r *policyReconciler) feed(ctx context.Context) []types.NamespacedName {
	// The node's addresses are part of the compiled state; until they could be read, each
	// sync tries again and, once they are known, starts a compiler that has them.
	if r.compiler == nil || (!r.compilerHasNode && r.nodeIPs == nil) {
		addrs := r.nodeAddrs(ctx)
		if r.compiler == nil || len(addrs) > 0 {
			r.compiler = policy.NewCompiler(addrs)
			// Fail fast on more ipBlock prefixes than the map holds (policy.CIDROverflowError).
			r.compiler.SetCIDRCapacity(int(r.maps.CIDRs.MaxEntries()))
			// Each policy gets the slot it had (its counters), also across agent restarts.
			r.compiler.ReserveSlots(r.names.Previous())
			r.compilerHasNode = len(addrs) > 0
			r.fullSynced = false
			clear(r.seen)
			clear(r.seenPods)
		}
	}
	c := r.compiler
	present := map[string]bool{}
	changed := func(kind string, m metav1.Object) bool {
		k := kind + "/" + m.GetNamespace() + "/" + m.GetName()
		present[k] = true
		if rv, ok := r.seen[k]; ok && rv == m.GetResourceVersion() {
			return false
		}
		r.seen[k] = m.GetResourceVersion()
		return true
	}
	// Namespaces first: a pod's shape includes its namespace's labels.
	for _, o := range r.nss.GetStore().List() {
		if ns := o.(*corev1.Namespace); changed("ns", ns) {
			c.SetNamespace(ns)
		}
	}
	var local []types.NamespacedName
	pods := map[types.NamespacedName]bool{}
	for _, o := range r.pods.GetStore().List() {
		p := o.(*corev1.Pod)
		if p.Spec.HostNetwork || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		nn := types.NamespacedName{Namespace: p.Namespace, Name: p.Name}
		pods[nn] = true
		if changed("pod", p) {
			c.SetPod(p)
		}
		if p.Spec.NodeName == r.node {
			local = append(local, nn)
		}
	}
	for nn := range r.seenPods {
		if !pods[nn] {
			c.DeletePod(nn)
			// A pod that comes back (say, a phase change undone) must be fed again.
			delete(r.seen, "pod/"+nn.Namespace+"/"+nn.Name)
		}
	}
	r.seenPods = pods
	for _, o := range r.nps.GetStore().List() {
		if np := o.(*networkingv1.NetworkPolicy); changed("np", np) {
			c.SetPolicy(np)
		}
	}
	for k := range r.seen {
		if present[k] {
			continue
		}
		kind, rest, _ := strings.Cut(k, "/")
		ns, name, _ := strings.Cut(rest, "/")
		switch kind {
		case "ns":
			c.DeleteNamespace(name)
		case "np":
			c.DeletePolicy(types.NamespacedName{Namespace: ns, Name: name})
		}
		delete(r.seen, k)
	}
	return local
}

func (r *policyReconciler) sync(ctx context.Context) error {
	localIDs := map[policy.Identity]bool{}
	r.compiled.Lock()
	local := r.feed(ctx)
	d, err := r.compiler.Desired()
	if errors.Is(err, policy.ErrTooManyCIDRs) {
		// Nothing compiled; the maps keep the last rules that fitted. The changes stay
		// pending (and touched), and the next sync after one that failed diffs whole maps.
		r.compiled.Unlock()
		r.fullSynced = false
		return err
	}
	touched := r.compiler.TakeTouched()
	r.desired = d
	r.compiled.Unlock()
	if err != nil {
		// One bad policy must not stall every other change; what Compile returns with the
		// error allows nothing the bad fields would have allowed.
		r.log.Warn("some networkpolicies have fields tern cannot enforce; they allow nothing", zap.Error(err))
	}
	for _, nn := range local {
		localIDs[d.PodIdentity[nn]] = true
	}
	// Previous local identities stay in the maps until the endpoints have moved to the new
	// ones, so no endpoint ever points at an identity without its rules.
	current := map[policy.Identity]bool{}
	for _, e := range r.reg.List() {
		current[policy.Identity(e.Identity)] = true
	}
	keepSet := maps.Clone(localIDs)
	for id := range current {
		keepSet[id] = true
	}
	keep := func(id policy.Identity) bool { return keepSet[id] }
	opts := policymap.Options{Local: keep, Audit: func(id policy.Identity) bool { return r.audit(d.Namespace[id]) }}
	// The first sync (and any after a failed one) diffs the whole maps, which also removes
	// what a previous agent left; later ones rewrite only the identities whose rules
	// changed or that became or stopped being local.
	full := !r.fullSynced
	r.fullSynced = false // until this sync succeeds
	write := func(subjects map[policy.Identity]bool) error {
		var err error
		if full {
			_, err = r.writer.Sync(policymap.Encode(d, opts))
		} else {
			_, err = r.writer.SyncSubjects(d, r.compiler.RulesOf, subjects, opts)
		}
		return err
	}
	subjects := maps.Clone(touched)
	for id := range keepSet {
		if !r.inMaps[id] {
			subjects[id] = true
		}
	}
	for id := range r.inMaps {
		if !keepSet[id] {
			subjects[id] = true
		}
	}
	// New policies' slots are named, their counters zeroed, before any entry refers to them.
	if err := r.names.Assign(d.Policies); err != nil {
		return err
	}
	if err := write(subjects); err != nil {
		return err
	}
	r.mu.Lock()
	r.lookup = &identityLookup{byPod: maps.Clone(d.PodIdentity), byAddr: maps.Clone(d.IPCache)}
	r.mu.Unlock()
	if err := r.reg.SetPolicy(r.endpointPolicy); err != nil {
		return fmt.Errorf("set endpoint identities: %w", err)
	}
	opts.Local = func(id policy.Identity) bool { return localIDs[id] }
	gone := map[policy.Identity]bool{}
	for id := range keepSet {
		if !localIDs[id] {
			gone[id] = true
		}
	}
	if err := write(gone); err != nil {
		return err
	}
	r.inMaps = localIDs
	r.fullSynced = true
	// Deleted policies' slots lose their names once no entry names them; slots kept for a
	// previous agent's policies that no longer exist are freed.
	r.compiler.DropReservations()
	if err := r.names.Release(d.Policies); err != nil {
		return err
	}
	return r.syncRemote(d)
}

// View is what NetworkPolicy does to a pod, from the last compiled state and the counters:
// `ternctl policy get`.
func (r *policyReconciler) View(namespace, name string) (api.PolicyView, *api.Error) {
	r.compiled.RLock()
	defer r.compiled.RUnlock()
	d := r.desired
	if d == nil {
		return api.PolicyView{}, &api.Error{Code: api.CodeTryAgainLater, Msg: "networkpolicy has not synced yet", Details: "retry in a moment"}
	}
	nn := types.NamespacedName{Namespace: namespace, Name: name}
	id, ok := d.PodIdentity[nn]
	if !ok {
		return api.PolicyView{}, &api.Error{Code: api.CodeUnknownPod, Msg: "no such pod in the cluster as the agent sees it",
			Details: fmt.Sprintf("pod %s (Succeeded, Failed and host-network pods have no policy)", nn)}
	}
	v := api.PolicyView{Pod: nn.String(), Identity: uint32(id), Shape: d.Shapes[id], Policies: []api.PolicyOfPod{}}
	if o, ok, _ := r.pods.GetStore().GetByKey(nn.String()); ok {
		v.Address = o.(*corev1.Pod).Status.PodIP
	}
	iso := d.Isolation[id]
	v.IsolatedIngress = iso&policy.IsolatedIngress != 0
	v.IsolatedEgress = iso&policy.IsolatedEgress != 0
	v.Audit = (v.IsolatedIngress || v.IsolatedEgress) && r.audit(namespace)
	describe := func(peer policy.Identity) string {
		switch {
		case peer == policy.IdentityAny:
			return "any"
		case peer.IsCIDR():
			for p, cid := range d.CIDRs {
				if cid == peer {
					return p.String()
				}
			}
		default:
			if s, ok := d.Shapes[peer]; ok {
				return s
			}
		}
		return fmt.Sprintf("identity %d", peer)
	}
	byIdx := map[uint32]*api.PolicyOfPod{}
	for _, idx := range d.Selecting[id] {
		name := d.Policies[idx]
		p := &api.PolicyOfPod{Name: name, Slot: policymap.Slot(idx), Rules: []api.PolicyRule{}}
		for _, dir := range []policy.Direction{policy.Ingress, policy.Egress} {
			if by, ok := d.IsolatedBy[policy.IsolationKey{Subject: id, Dir: dir}]; ok && by == idx {
				p.Isolates = append(p.Isolates, dir.String())
			}
		}
		byIdx[idx] = p
	}
	for k := range r.compiler.RulesOf(id) {
		p := byIdx[d.Rules[k]]
		if p == nil {
			continue
		}
		rv := policymap.RuleView(k)
		rv.Peer = describe(k.Peer)
		p.Rules = append(p.Rules, rv)
	}
	for _, idx := range d.Selecting[id] {
		p := byIdx[idx]
		if p.Slot != 0 {
			c, err := policymap.Counters(r.maps.Stats, p.Slot)
			if err != nil {
				return v, &api.Error{Code: api.CodeInternal, Msg: "read policy counters", Details: err.Error()}
			}
			p.Counters = c
		}
		policymap.SortRules(p.Rules)
		v.Policies = append(v.Policies, *p)
	}
	return v, nil
}

// endpointPolicy is the registry's PolicyFunc: the identity of the pod by name (an attach
// names it), else by address (endpoints found in the map after a restart).
func (r *policyReconciler) endpointPolicy(pod string, addr netip.Addr) (uint32, bool) {
	r.mu.Lock()
	l := r.lookup
	r.mu.Unlock()
	if l == nil {
		return 0, false
	}
	if ns, name, ok := strings.Cut(pod, "/"); ok {
		if id, ok := l.byPod[types.NamespacedName{Namespace: ns, Name: name}]; ok {
			return uint32(id), r.enforce
		}
	}
	return uint32(l.byAddr[addr]), r.enforce
}

// syncRemote writes the identities of pod addresses that are not local endpoints (the
// registry owns those) and removes the ones that left.
func (r *policyReconciler) syncRemote(d *policy.Desired) error {
	local := map[netip.Addr]bool{}
	for _, e := range r.reg.List() {
		local[e.Addr] = true
	}
	c := r.reg.Cache()
	for a, v := range policymap.IPCache(d) {
		if local[a] {
			continue
		}
		if err := c.Set(netip.PrefixFrom(a, 32), endpoint.Entry{Identity: v.Identity, Flags: v.Flags}); err != nil {
			return err
		}
		r.remote[a] = true
	}
	for a := range r.remote {
		if _, ok := d.IPCache[a]; ok && !local[a] {
			continue
		}
		delete(r.remote, a)
		if local[a] {
			continue // now a local endpoint's: the registry wrote it
		}
		if err := c.Delete(netip.PrefixFrom(a, 32)); err != nil {
			return err
		}
	}
	return nil
}

// startPolicy starts the NetworkPolicy reconciler and registers its readiness: the node
// takes no pods before the first full policy sync is in the maps.
func (c *Component) startPolicy(ctx context.Context) error {
	reg := c.deps.Endpoints
	if reg == nil {
		return fmt.Errorf("networkpolicy: the endpoint registry is not loaded")
	}
	cfg := c.deps.Config
	ready, err := c.deps.Readiness.Register("networkpolicy", "waiting for the first sync of Pods, Namespaces and NetworkPolicies")
	if err != nil {
		return err
	}
	auditNS := map[string]bool{}
	for _, ns := range cfg.NetworkPolicy.AuditNamespaces {
		auditNS[ns] = true
	}
	audit := func(ns string) bool { return cfg.NetworkPolicy.Audit || auditNS[ns] }
	r, err := newPolicyReconciler(c.client, cfg.NodeName, cfg.PolicyEnforced(), audit, reg, c.deps.Datapath.PolicyMaps(), ready,
		c.recorder, c.deps.Registry, c.log)
	if err != nil {
		return err
	}
	c.deps.SetPolicyView(r.View)
	c.log.Info("networkpolicy", zap.Bool("enforce", cfg.PolicyEnforced()), zap.Bool("audit", cfg.NetworkPolicy.Audit),
		zap.Strings("auditNamespaces", cfg.NetworkPolicy.AuditNamespaces))
	c.wg.Add(1)
	go func() { defer c.wg.Done(); r.run(ctx, &c.wg) }()
	return nil
}
