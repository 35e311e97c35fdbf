package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"sort"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/endpoint"
	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/ipam/aliyun"
)

func (a *Agent) handler() http.Handler {
	mux := http.NewServeMux()
	route := func(method, path string, h func(*http.Request) (any, *api.Error)) {
		mux.HandleFunc(method+" "+path, func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			out, aerr := readRequest(w, r)
			if aerr == nil {
				out, aerr = h(r)
			}
			if tc, ok := r.Context().Value(trackedConnKey{}).(*trackedConn); ok {
				// Idle on a kept-alive connection, it may be evicted again.
				defer tc.delivered.Store(false)
			}
			code := http.StatusOK
			if aerr != nil {
				out, code = aerr, httpStatus(aerr.Code)
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(code)
			_ = json.NewEncoder(w).Encode(out)
			result := "ok"
			if aerr != nil {
				result = strconv.Itoa(int(aerr.Code))
			}
			a.m.requests.WithLabelValues(path, result).Inc()
			a.m.duration.WithLabelValues(path).Observe(time.Since(start).Seconds())
		})
	}
	route(http.MethodPost, api.PathAllocate, a.handleAllocate)
	route(http.MethodPost, api.PathLookup, a.handleLookup)
	route(http.MethodPost, api.PathRelease, a.handleRelease)
	route(http.MethodPost, api.PathAttach, a.handleAttach)
	route(http.MethodPost, api.PathDetach, a.handleDetach)
	route(http.MethodPost, api.PathGC, a.handleGC)
	route(http.MethodGet, api.PathStatus, a.handleStatus)
	route(http.MethodGet, api.PathState, a.handleState)
	route(http.MethodGet, api.PathReady, a.handleReadiness)
	route(http.MethodPost, api.PathPolicy, a.handlePolicy)
	mux.Handle("GET "+api.PathReadyz, a.readiness)
	mux.Handle("GET "+api.PathMetrics, promhttp.HandlerFor(a.reg, promhttp.HandlerOpts{}))
	return mux
}

func (a *Agent) handlePolicy(r *http.Request) (any, *api.Error) {
	var ref api.PodRef
	if aerr := decode(r, &ref); aerr != nil {
		return nil, aerr
	}
	if ref.Namespace == "" || ref.Name == "" {
		return nil, &api.Error{Code: api.CodeDecodeFailure, Msg: "policy: namespace and name are required"}
	}
	a.mu.Lock()
	view := a.policyView
	a.mu.Unlock()
	if view == nil {
		return nil, &api.Error{Code: api.CodeNotAvailable, Msg: "networkpolicy is not running in this agent",
			Details: "it needs a kubeconfig; `ternctl bpf policy get` reads the pinned maps instead"}
	}
	return view(ref.Namespace, ref.Name)
}

func httpStatus(code uint) int {
	switch code {
	case api.CodeTryAgainLater:
		return http.StatusServiceUnavailable
	case api.CodeDecodeFailure, api.CodeInvalidConfig, api.CodeInvalidEnv:
		return http.StatusBadRequest
	case api.CodeUnknownPod:
		return http.StatusNotFound
	default:
		return http.StatusInternalServerError
	}
}

// readRequest reads the whole body (at most MaxRequestBody) before any handler runs, so a
// handler never waits on a slow client, and marks the connection as having delivered it.
func readRequest(w http.ResponseWriter, r *http.Request) (any, *api.Error) {
	if r.ContentLength > MaxRequestBody {
		return nil, &api.Error{Code: api.CodeDecodeFailure,
			Msg: fmt.Sprintf("request body of %d bytes exceeds the limit of %d bytes", r.ContentLength, MaxRequestBody)}
	}
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxRequestBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, &api.Error{Code: api.CodeDecodeFailure, Msg: fmt.Sprintf("request body exceeds the limit of %d bytes", MaxRequestBody)}
		}
		return nil, &api.Error{Code: api.CodeDecodeFailure, Msg: "read request body", Details: err.Error()}
	}
	r.Body = io.NopCloser(bytes.NewReader(b))
	requestRead(r)
	return nil, nil
}

func decode(r *http.Request, v any) *api.Error {
	if err := json.NewDecoder(r.Body).Decode(v); err != nil {
		return &api.Error{Code: api.CodeDecodeFailure, Msg: "decode request body", Details: err.Error()}
	}
	return nil
}

// poolOrRetry returns the pool, or a try-again error while the agent is still starting.
func (a *Agent) poolOrRetry() (ipam.Allocator, *api.Error) {
	if a.cfg.IPAM.Off() {
		return nil, &api.Error{Code: api.CodeIPAMOff, Msg: "tern's IPAM is off on this node (ipam.mode none): tern-cni must run chained, after a plugin that gives the pod its interface and address (docs/cni.md, \"Chaining\")"}
	}
	p := a.startedPool()
	if p == nil || !a.ready.Load() {
		return nil, &api.Error{Code: api.CodeTryAgainLater, Msg: "tern-agent is starting: the IP pool is not ready yet; try again"}
	}
	return p, nil
}

// errorFor maps a pool error to a CNI error code.
func errorFor(err error) *api.Error {
	switch {
	case errors.Is(err, ipam.ErrPoolEmptyTryAgain), errors.Is(err, ipam.ErrNotStarted),
		errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return &api.Error{Code: api.CodeTryAgainLater, Msg: "no IP address available yet: the pool is refilling; try again", Details: err.Error()}
	case errors.Is(err, ipam.ErrTryAgain):
		return &api.Error{Code: api.CodeTryAgainLater, Msg: "the pod's fixed address is not free yet (see the pod's Events); try again", Details: err.Error()}
	case errors.Is(err, ipam.ErrWrongZone):
		return &api.Error{Code: api.CodeInvalidConfig, Msg: "the pod's fixed address is in another zone: schedule it in the address's zone (see the pod's Events)", Details: err.Error()}
	case errors.Is(err, ipam.ErrVSwitchExhausted):
		return &api.Error{Code: api.CodeVSwitchExhaust, Msg: "vSwitch exhausted", Details: err.Error()}
	case errors.Is(err, ipam.ErrNodeFull):
		return &api.Error{Code: api.CodeNodeFull, Msg: "node is at its capacity for the pod's kind of network resource (ENI IPs, exclusive ENIs or member ENIs); schedule the pod elsewhere", Details: err.Error()}
	case errors.Is(err, ipam.ErrKindNotOffered):
		return &api.Error{Code: api.CodeInvalidConfig, Msg: "the pod asks for a kind of network resource this node does not offer: label the node (k8s.aliyun.com/exclusive-mode-eni-type: eniOnly for exclusive ENIs), set eni_conf enable_eni_trunking: true (member ENIs), or schedule the pod to a node that has it", Details: err.Error()}
	case errors.Is(err, ipam.ErrBadPodRequest):
		return &api.Error{Code: api.CodeInvalidConfig, Msg: "the pod's network annotations are invalid: fix them on the pod", Details: err.Error()}
	case errors.Is(err, aliyun.ErrBadVSwitch):
		return &api.Error{Code: api.CodeInvalidConfig, Msg: "eni_conf names a vSwitch the cloud does not know: fix vswitches in eni_conf (the agent reloads it)", Details: err.Error()}
	case errors.Is(err, aliyun.ErrCredentials), errors.Is(err, aliyun.ErrForbidden):
		return &api.Error{Code: api.CodeCloudAuth, Msg: "the cloud API refused the agent's credentials or permissions", Details: err.Error()}
	default:
		return &api.Error{Code: api.CodeInternal, Msg: "IP allocation failed", Details: err.Error()}
	}
}

func toAPI(al ipam.Allocation) api.Allocation {
	out := api.Allocation{IP: al.IP.String(), Kind: string(al.Kind), ENI: api.ENI{
		ID: al.ENI.ID, MAC: al.ENI.MAC, PrimaryIP: al.ENI.PrimaryIP.String(), Gateway: al.ENI.Gateway.String(),
		VSwitchID: al.ENI.VSwitchID, VSwitchCIDR: al.ENI.VSwitchCIDR.String(), NodePrimary: al.ENI.NodePrimary,
	}, VLAN: al.VLAN, MemberENI: al.MemberENI}
	for _, p := range al.ViaVeth {
		out.ViaVeth = append(out.ViaVeth, p.String())
	}
	return out
}

// podAndPool validates a request's pod and returns the pool to serve it ("try again" while
// the pool is starting).
func (a *Agent) podAndPool(ref api.PodRef) (ipam.PodKey, ipam.Allocator, *api.Error) {
	key, e := podKey(ref)
	if e != nil {
		return key, nil, e
	}
	pool, e := a.poolOrRetry()
	return key, pool, e
}

func (a *Agent) handleAllocate(r *http.Request) (any, *api.Error) {
	var req api.AllocateRequest
	if e := decode(r, &req); e != nil {
		return nil, e
	}
	key, pool, e := a.podAndPool(req.PodRef)
	if e != nil {
		return nil, e
	}
	unlock := a.sandboxes.lock(key.ContainerID)
	defer unlock()
	// A client that gave up (its timeout passed while this request queued) gets nothing: the
	// runtime has moved on and would leave the address behind until GC.
	if err := r.Context().Err(); err != nil {
		return nil, &api.Error{Code: api.CodeTryAgainLater, Msg: "the client left before its allocation started; nothing was allocated", Details: err.Error()}
	}
	if owner, ok := sandboxOwner(pool, key.ContainerID); ok && owner != key {
		return nil, &api.Error{Code: api.CodeInvalidEnv, Msg: fmt.Sprintf(
			"container ID %s already holds an address for pod %s/%s; refusing a second one for %s/%s: a sandbox belongs to one pod (DEL it first)",
			key.ContainerID, owner.Namespace, owner.Name, key.Namespace, key.Name)}
	}
	_, existed := pool.Allocations()[key]
	al, err := a.allocateFor(r.Context(), pool, req, key)
	a.notifyAllocate(key, err)
	if err != nil {
		ae := errorFor(err)
		a.log.Warn("allocate failed", zap.Stringer("pod", key), zap.Uint("code", ae.Code), zap.Error(err))
		return nil, ae
	}
	if cerr := r.Context().Err(); cerr != nil && !existed {
		// Nobody will read the answer: give the address back rather than strand it.
		if err := pool.Release(context.WithoutCancel(r.Context()), key); err != nil {
			a.log.Warn("release of an allocation whose client left failed; GC will release it", zap.Stringer("pod", key), zap.Error(err))
		}
		a.log.Info("client left during allocation; released its address", zap.Stringer("pod", key), zap.Stringer("ip", al.IP))
		return nil, &api.Error{Code: api.CodeTryAgainLater, Msg: "the client left during its allocation; the address was released", Details: cerr.Error()}
	}
	a.log.Debug("allocated", zap.Stringer("pod", key), zap.Stringer("ip", al.IP), zap.String("eni", al.ENI.ID))
	return toAPI(al), nil
}

// podOrSandbox resolves a lookup or release: a full pod reference, or — for a DEL whose
// runtime sent no K8S_POD_* arguments — a container ID alone, matched against the
// allocations. ok is false when a bare container ID holds nothing.
func (a *Agent) podOrSandbox(ref api.PodRef) (key ipam.PodKey, pool ipam.Allocator, ok bool, e *api.Error) {
	if ref.Namespace != "" || ref.Name != "" {
		key, pool, e = a.podAndPool(ref)
		return key, pool, e == nil, e
	}
	if err := api.ValidateContainerID(ref.ContainerID); err != nil {
		return key, nil, false, &api.Error{Code: api.CodeInvalidEnv, Msg: err.Error()}
	}
	if pool, e = a.poolOrRetry(); e != nil {
		return key, nil, false, e
	}
	key, ok = sandboxOwner(pool, ref.ContainerID)
	return key, pool, ok, nil
}

func (a *Agent) handleLookup(r *http.Request) (any, *api.Error) {
	var req api.PodRef
	if e := decode(r, &req); e != nil {
		return nil, e
	}
	key, pool, found, e := a.podOrSandbox(req)
	if e != nil {
		return nil, e
	}
	if !found {
		return api.LookupResponse{}, nil
	}
	al, ok := pool.Allocations()[key]
	if !ok {
		return api.LookupResponse{}, nil
	}
	out := toAPI(al)
	return api.LookupResponse{Found: true, Allocation: &out, Pod: &api.PodRef{Namespace: key.Namespace, Name: key.Name, ContainerID: key.ContainerID}}, nil
}

func (a *Agent) handleRelease(r *http.Request) (any, *api.Error) {
	var req api.PodRef
	if e := decode(r, &req); e != nil {
		return nil, e
	}
	key, pool, found, e := a.podOrSandbox(req)
	if e != nil {
		return nil, e
	}
	if !found {
		return api.ReleaseResponse{}, nil
	}
	unlock := a.sandboxes.lock(key.ContainerID)
	defer unlock()
	al, ok := pool.Allocations()[key]
	if ok {
		if err := a.untagMemberPod(al); err != nil {
			return nil, &api.Error{Code: api.CodeDatapath, Msg: fmt.Sprintf("remove the VLAN of member pod %s before releasing it", al.IP), Details: err.Error()}
		}
		if err := a.forgetEndpointsAt(al.IP); err != nil {
			return nil, &api.Error{Code: api.CodeDatapath, Msg: fmt.Sprintf("forget the endpoint record of %s before releasing it", al.IP), Details: err.Error()}
		}
	}
	if err := pool.Release(r.Context(), key); err != nil {
		return nil, &api.Error{Code: api.CodeInternal, Msg: "release failed", Details: err.Error()}
	}
	if !ok {
		return api.ReleaseResponse{}, nil
	}
	a.log.Debug("released", zap.Stringer("pod", key), zap.Stringer("ip", al.IP))
	return api.ReleaseResponse{IP: al.IP.String()}, nil
}

func (a *Agent) handleAttach(r *http.Request) (any, *api.Error) {
	var req api.AttachRequest
	if e := decode(r, &req); e != nil {
		return nil, e
	}
	dp := a.loadedDatapath()
	if dp == nil {
		return nil, &api.Error{Code: api.CodeTryAgainLater, Msg: "tern-agent is starting: the datapath is not loaded yet; try again"}
	}
	if err := checkPodVeth(req.IfIndex, req.Chained); err != nil {
		return nil, &api.Error{Code: api.CodeInvalidConfig, Msg: "attach: " + err.Error()}
	}
	ep, record, err := endpointOf(req)
	if err != nil {
		return nil, &api.Error{Code: api.CodeInvalidConfig, Msg: "attach: " + err.Error()}
	}
	if record {
		a.markExclusive(req, &ep)
	}
	if e := a.recordAttach(req, ep); e != nil {
		return nil, e
	}
	a.attachMu.Lock()
	defer a.attachMu.Unlock()
	// The endpoint is recorded before the programs run on the veth, so they never see an
	// unknown pod.
	if record {
		if err := a.endpointRegistry().Upsert(ep); err != nil {
			return nil, &api.Error{Code: api.CodeDatapath, Msg: fmt.Sprintf("record endpoint %s on ifindex %d", ep.Addr, req.IfIndex), Details: err.Error()}
		}
		a.notifyEndpoint(req.IfIndex, true)
	}
	mode, err := dp.AttachPod(req.IfIndex)
	if err != nil {
		return nil, &api.Error{Code: api.CodeDatapath, Msg: fmt.Sprintf("attach pod programs to ifindex %d", req.IfIndex), Details: err.Error()}
	}
	// A new ENI gets the netdev programs with its first pod (netdev.go).
	a.ensureNetdevFor(dp, ep.Addr)
	if e := a.tagIfMember(dp, req.PodRef); e != nil {
		return nil, e
	}
	return api.AttachResponse{Mode: string(mode)}, nil
}

// endpointRegistry is the registry of the pods the node serves; nil until Run has loaded
// the datapath (components get it in Deps).
func (a *Agent) endpointRegistry() *endpoint.Registry {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.endpoints
}

// handleDetach removes the programs and their link pins before the CNI deletes the veth; a
// tcx link pin would otherwise outlive its device in the pin root.
func (a *Agent) handleDetach(r *http.Request) (any, *api.Error) {
	var req api.AttachRequest
	if e := decode(r, &req); e != nil {
		return nil, e
	}
	dp := a.loadedDatapath()
	if dp == nil {
		return nil, &api.Error{Code: api.CodeTryAgainLater, Msg: "tern-agent is starting: the datapath is not loaded yet; try again"}
	}
	ifindex, e := a.detachTarget(req)
	if e != nil {
		return nil, e
	}
	if ifindex == 0 {
		return struct{}{}, nil // a repeated DEL: nothing is recorded any more
	}
	if err := a.detach(ifindex); err != nil {
		return nil, &api.Error{Code: api.CodeDatapath, Msg: fmt.Sprintf("detach pod programs from ifindex %d", ifindex), Details: err.Error()}
	}
	return struct{}{}, nil
}

func (a *Agent) handleGC(r *http.Request) (any, *api.Error) {
	var req api.GCRequest
	if e := decode(r, &req); e != nil {
		return nil, e
	}
	// A request without the list is not "nothing is valid": that reading once released every
	// pod of the node.
	if req.ValidAttachments == nil {
		return nil, &api.Error{Code: api.CodeInvalidConfig,
			Msg: "GC request lacks validAttachments (CNI GC's cni.dev/valid-attachments); nothing was released"}
	}
	valid := map[string]bool{}
	for _, v := range req.ValidAttachments {
		valid[v.ContainerID] = true
	}
	if a.cfg.IPAM.Off() {
		if !a.ready.Load() {
			return nil, &api.Error{Code: api.CodeTryAgainLater, Msg: "tern-agent is starting; try again"}
		}
		out, err := a.gcChained(valid)
		if err != nil {
			return nil, &api.Error{Code: api.CodeInternal, Msg: "garbage collection failed", Details: err.Error()}
		}
		return out, nil
	}
	if _, e := a.poolOrRetry(); e != nil {
		return nil, e
	}
	res, err := a.GC(r.Context(), func(k ipam.PodKey) bool { return valid[k.ContainerID] })
	out := api.GCResponse{DeletedENIs: res.DeletedENIs, AdoptedENIs: res.AdoptedENIs}
	for _, k := range res.Released {
		out.Released = append(out.Released, api.PodRef{Namespace: k.Namespace, Name: k.Name, ContainerID: k.ContainerID})
	}
	if err != nil {
		return nil, &api.Error{Code: api.CodeInternal, Msg: "garbage collection failed", Details: err.Error()}
	}
	return out, nil
}

func (a *Agent) handleStatus(*http.Request) (any, *api.Error) {
	return a.cniStatus(), nil // agent/ready.go
}

func (a *Agent) handleState(*http.Request) (any, *api.Error) {
	if a.cfg.IPAM.Off() {
		return api.State{NodeName: a.cfg.NodeName, InstanceID: a.cfg.InstanceID, Allocations: map[string]api.Allocation{},
			BandwidthMode: string(a.bandwidthMode())}, nil
	}
	pool, e := a.poolOrRetry()
	if e != nil {
		return nil, e
	}
	s := pool.Status()
	out := api.State{NodeName: a.cfg.NodeName, InstanceID: a.cfg.InstanceID, Idle: s.Idle, InUse: s.InUse,
		MaxPods: s.Capacity.MaxPods, Allocations: map[string]api.Allocation{},
		Pool: api.PoolLimits{InstanceType: s.Capacity.InstanceType, MinPoolSize: s.MinPoolSize, MaxPoolSize: s.MaxPoolSize,
			IdleReclaimSec: int(s.IdleReclaimAfter / time.Second), ENIQuota: s.Capacity.ENIs, IPsPerENI: s.Capacity.IPsPerENI},
		BandwidthMode: string(a.bandwidthMode())}
	for _, e := range s.ENIs {
		st := api.ENIState{ID: e.ID, MAC: e.MAC, VSwitchID: e.VSwitchID, IPs: addrs(e.IPs), InUse: addrs(e.InUse)}
		if e.PrimaryIP.IsValid() {
			st.PrimaryIP = e.PrimaryIP.String()
		}
		if e.VSwitchCIDR.IsValid() {
			st.VSwitchCIDR = e.VSwitchCIDR.String()
		}
		out.ENIs = append(out.ENIs, st)
	}
	for k, al := range pool.Allocations() {
		out.Allocations[k.String()] = toAPI(al)
	}
	return out, nil
}

// handleReadiness lists every readiness component (ternctl status); /readyz says the same
// in the probe's text form.
func (a *Agent) handleReadiness(*http.Request) (any, *api.Error) {
	st := a.readiness.Status()
	out := api.Readiness{Ready: st.Ready, Components: make([]api.ComponentReadiness, len(st.Components))}
	for i, c := range st.Components {
		out.Components[i] = api.ComponentReadiness{Name: c.Name, Ready: c.Ready, Reason: c.Reason, Since: c.Since}
	}
	return out, nil
}

func addrs(in []netip.Addr) []string {
	out := make([]string, len(in))
	for i, a := range in {
		out[i] = a.String()
	}
	sort.Strings(out)
	return out
}
