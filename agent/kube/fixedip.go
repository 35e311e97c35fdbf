package kube

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"go.uber.org/zap"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/ipam/aliyun"
	"github.com/tern-net/tern/ipam/fixedip"
)

// FixedIPResource is the FixedIP custom resource (deploy/manifests/05-fixedip-crd.yaml).
var FixedIPResource = schema.GroupVersionResource{Group: "tern.io", Version: "v1alpha1", Resource: "fixedips"}

// Label on every FixedIP record: the node that has its address, for `kubectl get fip -l`.
const labelFixedIPNode = "tern.io/node"

// FixedIPs connects ipam/fixedip to the apiserver: FixedIP records through the dynamic
// client, the pod's annotation and owner from this node's pod informer, StatefulSets from an
// informer of their own, Events through the component's recorder. It is built before the
// agent runs, because its allocator wrapper (Wrap) must be in place before the pool serves
// its first ADD; the Kubernetes component gives it the informers and recorder when it starts.
type FixedIPs struct {
	dyn  dynamic.Interface
	node string
	hold time.Duration
	log  *zap.Logger

	// Set by start; the hold pass may run before the component starts.
	mu       sync.Mutex
	pods     cache.SharedIndexInformer
	sets     cache.SharedIndexInformer
	recorder record.EventRecorder
}

// NewFixedIPs builds the fixed-address glue for node; hold is the configured hold time of a
// deleted pod's address (0: ipam/fixedip's default). Register Wrap with agent.WrapAllocator
// and pass the result in Options.Fixed.
func NewFixedIPs(dyn dynamic.Interface, node string, hold time.Duration, log *zap.Logger) *FixedIPs {
	if log == nil {
		log = zap.NewNop()
	}
	return &FixedIPs{dyn: dyn, node: node, hold: hold, log: log.Named("kube")}
}

func (f *FixedIPs) started() (pods, sets cache.SharedIndexInformer, rec record.EventRecorder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pods, f.sets, f.recorder
}

// Wrap is the agent.AllocatorWrapper that gives StatefulSet pods their fixed addresses (ENIIP
// mode only: a route-mode pool is left alone).
func (f *FixedIPs) Wrap(pool ipam.Allocator, cloud *aliyun.Client) (ipam.Allocator, error) {
	p, ok := pool.(*ipam.Pool)
	if !ok || cloud == nil {
		// Said once at start, so that a pod's pod-ip-fixed annotation being ignored is
		// explained (and a wiring mistake does not pass silently, as one did).
		f.log.Info("fixed IPs for StatefulSets are off: they need the ENIIP pool", zap.String("allocator", fmt.Sprintf("%T", pool)))
		return pool, nil
	}
	return fixedip.New(fixedip.Options{Pool: p, Cloud: cloud, Records: f, Pods: f, Events: f,
		Node: f.node, HoldTime: f.hold, Logger: f.log})
}

// startFixedIP starts the StatefulSet informer (the hold pass asks it whether an ordinal
// still exists).
func (c *Component) startFixedIP(ctx context.Context) {
	if c.fixed == nil {
		return
	}
	f := informers.NewSharedInformerFactory(c.client, 0)
	sets := f.Apps().V1().StatefulSets().Informer()
	c.fixed.mu.Lock()
	c.fixed.pods, c.fixed.sets, c.fixed.recorder = c.pods, sets, c.recorder
	c.fixed.mu.Unlock()
	c.wg.Add(1)
	go func() { defer c.wg.Done(); sets.Run(ctx.Done()) }()
}

func (f *FixedIPs) Pod(ctx context.Context, namespace, name string) (fixedip.Pod, bool) {
	for {
		if inf, _, _ := f.started(); inf != nil && inf.HasSynced() {
			if o, ok, _ := inf.GetStore().GetByKey(namespace + "/" + name); ok {
				if p := o.(*corev1.Pod); p.DeletionTimestamp == nil {
					return podOf(p), true
				}
			}
		}
		select {
		case <-ctx.Done():
			return fixedip.Pod{}, false
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func podOf(p *corev1.Pod) fixedip.Pod {
	out := fixedip.Pod{Namespace: p.Namespace, Name: p.Name, UID: string(p.UID), Fixed: p.Annotations[fixedip.Annotation] == "true", Ordinal: -1}
	if ref := metav1.GetControllerOf(p); ref != nil && ref.Kind == "StatefulSet" && ref.APIVersion == "apps/v1" {
		out.StatefulSet = ref.Name
		out.Ordinal = fixedip.Ordinal(p.Name, ref.Name)
	}
	return out
}

func (f *FixedIPs) StatefulSet(namespace, name string) (fixedip.SetState, error) {
	_, sets, _ := f.started()
	if sets == nil || !sets.HasSynced() {
		return fixedip.SetState{}, errors.New("StatefulSet cache not synced yet")
	}
	o, ok, err := sets.GetStore().GetByKey(namespace + "/" + name)
	if err != nil || !ok {
		return fixedip.SetState{}, err
	}
	s := o.(*appsv1.StatefulSet)
	if s.DeletionTimestamp != nil {
		return fixedip.SetState{}, nil
	}
	replicas := 1
	if s.Spec.Replicas != nil {
		replicas = int(*s.Spec.Replicas)
	}
	return fixedip.SetState{Exists: true, Replicas: replicas}, nil
}

func (f *FixedIPs) PodEvent(namespace, name string, warning bool, reason, message string) {
	pods, _, rec := f.started()
	if rec == nil {
		return
	}
	typ := corev1.EventTypeNormal
	if warning {
		typ = corev1.EventTypeWarning
	}
	ref := &corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: namespace, Name: name}
	if pods != nil {
		if o, ok, _ := pods.GetStore().GetByKey(namespace + "/" + name); ok {
			ref.UID = o.(*corev1.Pod).UID
		}
	}
	rec.Event(ref, typ, reason, boundEventMessage(message))
}

func (f *FixedIPs) res(namespace string) dynamic.ResourceInterface {
	return f.dyn.Resource(FixedIPResource).Namespace(namespace)
}

func (f *FixedIPs) Get(ctx context.Context, namespace, name string) (*fixedip.Record, error) {
	u, err := f.res(namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("get FixedIP %s/%s: %w", namespace, name, err)
	}
	r, err := recordOf(u)
	if err != nil {
		return nil, err
	}
	return &r, nil
}

func (f *FixedIPs) Create(ctx context.Context, r fixedip.Record) (fixedip.Record, error) {
	u := toUnstructured(r)
	if r.StatefulSet != "" {
		// Owned by the StatefulSet: deleting it removes the records (the garbage collector),
		// and the nodes holding their addresses release them.
		if inf, _, _ := f.started(); inf != nil {
			if o, ok, _ := inf.GetStore().GetByKey(r.Namespace + "/" + r.Name); ok {
				if ref := metav1.GetControllerOf(o.(*corev1.Pod)); ref != nil && ref.Kind == "StatefulSet" {
					u.SetOwnerReferences([]metav1.OwnerReference{{APIVersion: ref.APIVersion, Kind: ref.Kind, Name: ref.Name, UID: ref.UID}})
				}
			}
		}
	}
	out, err := f.res(r.Namespace).Create(ctx, u, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return fixedip.Record{}, fmt.Errorf("create FixedIP %s/%s: %w", r.Namespace, r.Name, fixedip.ErrConflict)
	}
	if err != nil {
		return fixedip.Record{}, fmt.Errorf("create FixedIP %s/%s: %w", r.Namespace, r.Name, err)
	}
	return recordOf(out)
}

func (f *FixedIPs) Update(ctx context.Context, r fixedip.Record) (fixedip.Record, error) {
	cur, err := f.res(r.Namespace).Get(ctx, r.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return fixedip.Record{}, fmt.Errorf("update FixedIP %s/%s: gone: %w", r.Namespace, r.Name, fixedip.ErrConflict)
	}
	if err != nil {
		return fixedip.Record{}, fmt.Errorf("update FixedIP %s/%s: %w", r.Namespace, r.Name, err)
	}
	// Keep what the agent does not own (owner references, other labels), and write on the
	// resourceVersion the decision was made on: the apiserver refuses a stale one.
	u := toUnstructured(r)
	cur.Object["spec"] = u.Object["spec"]
	labels := cur.GetLabels()
	if labels == nil {
		labels = map[string]string{}
	}
	labels[labelFixedIPNode] = r.Node
	cur.SetLabels(labels)
	cur.SetResourceVersion(r.ResourceVersion)
	out, err := f.res(r.Namespace).Update(ctx, cur, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
		return fixedip.Record{}, fmt.Errorf("update FixedIP %s/%s at resourceVersion %s: %w", r.Namespace, r.Name, r.ResourceVersion, fixedip.ErrConflict)
	}
	if err != nil {
		return fixedip.Record{}, fmt.Errorf("update FixedIP %s/%s: %w", r.Namespace, r.Name, err)
	}
	return recordOf(out)
}

func (f *FixedIPs) Delete(ctx context.Context, r fixedip.Record) error {
	rv := r.ResourceVersion
	err := f.res(r.Namespace).Delete(ctx, r.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{ResourceVersion: &rv}})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if apierrors.IsConflict(err) {
		return fmt.Errorf("delete FixedIP %s/%s at resourceVersion %s: %w", r.Namespace, r.Name, rv, fixedip.ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("delete FixedIP %s/%s: %w", r.Namespace, r.Name, err)
	}
	return nil
}

func toUnstructured(r fixedip.Record) *unstructured.Unstructured {
	spec := map[string]any{"ip": r.IP.String(), "vSwitchID": r.VSwitchID, "zoneID": r.ZoneID, "node": r.Node, "phase": string(r.Phase)}
	for k, v := range map[string]string{"eniID": r.ENIID, "podUID": r.PodUID, "previousNode": r.PreviousNode,
		"previousENI": r.PreviousENI, "statefulSet": r.StatefulSet} {
		if v != "" {
			spec[k] = v
		}
	}
	if !r.ReleaseAfter.IsZero() {
		// Whole seconds, rounded up: a hold is never shorter than configured.
		at := r.ReleaseAfter.UTC()
		if t := at.Truncate(time.Second); t.Before(at) {
			at = t.Add(time.Second)
		}
		spec["releaseAfter"] = at.Format(time.RFC3339)
	}
	u := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "tern.io/v1alpha1", "kind": "FixedIP", "spec": spec}}
	u.SetNamespace(r.Namespace)
	u.SetName(r.Name)
	u.SetLabels(map[string]string{labelFixedIPNode: r.Node})
	u.SetResourceVersion(r.ResourceVersion)
	return u
}

func recordOf(u *unstructured.Unstructured) (fixedip.Record, error) {
	str := func(k string) string { s, _, _ := unstructured.NestedString(u.Object, "spec", k); return s }
	r := fixedip.Record{Namespace: u.GetNamespace(), Name: u.GetName(), VSwitchID: str("vSwitchID"), ZoneID: str("zoneID"),
		Node: str("node"), ENIID: str("eniID"), PodUID: str("podUID"), Phase: fixedip.Phase(str("phase")),
		PreviousNode: str("previousNode"), PreviousENI: str("previousENI"), StatefulSet: str("statefulSet"),
		ResourceVersion: u.GetResourceVersion()}
	ip, err := netip.ParseAddr(str("ip"))
	if err != nil {
		return r, fmt.Errorf("FixedIP %s/%s: spec.ip %q: %w; fix or delete the record", r.Namespace, r.Name, str("ip"), err)
	}
	r.IP = ip
	if s := str("releaseAfter"); s != "" {
		if r.ReleaseAfter, err = time.Parse(time.RFC3339, s); err != nil {
			return r, fmt.Errorf("FixedIP %s/%s: spec.releaseAfter %q: %w", r.Namespace, r.Name, s, err)
		}
	}
	return r, nil
}
