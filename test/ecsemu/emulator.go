// Package ecsemu emulates the Alibaba Cloud ECS and VPC OpenAPI closely enough that tern's
// IPAM, driven by the real alibaba-cloud-sdk-go, can be tested without a cloud: RPC-style
// requests signed with HMAC-SHA1 (v1), JSON replies and error codes as the real service sends
// them, asynchronous ENI states, quotas, vSwitch exhaustion, fault injection, and an
// instance-metadata service. Behind the API an SDN (see NetnsSDN) can make ENIs real: veth
// links in node network namespaces, routed by a VPC namespace.
package ecsemu

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// API versions the emulator speaks.
const (
	ECSVersion = "2014-05-26"
	VPCVersion = "2016-04-28"
)

// ENI states and types, as the API spells them.
const (
	StatusAvailable = "Available"
	StatusAttaching = "Attaching"
	StatusInUse     = "InUse"
	StatusDetaching = "Detaching"
	StatusDeleting  = "Deleting"

	TypePrimary   = "Primary"
	TypeSecondary = "Secondary"
	TypeTrunk     = "Trunk"
)

// availableENIIPLimit is how many addresses (primary included) an ENI that is not attached may
// hold: the API documentation allows 49 secondary addresses on an Available ENI.
const availableENIIPLimit = 50

// Option configures an Emulator.
type Option func(*Emulator)

// WithSDN makes ENI attachment and address assignment real through sdn (default NopSDN).
func WithSDN(sdn SDN) Option { return func(e *Emulator) { e.sdn = sdn } }

// WithLogger sets the logger (default zap.NewNop).
func WithLogger(l *zap.Logger) Option { return func(e *Emulator) { e.log = l } }

// WithClock replaces time.Now for signature timestamps and creation times.
func WithClock(now func() time.Time) Option { return func(e *Emulator) { e.now = now } }

// WithSeed makes generated IDs and MACs reproducible.
func WithSeed(seed uint64) Option { return func(e *Emulator) { e.seed = seed } }

// Fault makes calls fail with an error code. Action "" matches every action. Count 0 means
// unlimited, otherwise the fault fires Count times and is then removed. Rate in (0,1] makes
// each matching call fail with that probability; 0 means every matching call. Status 0 uses
// the HTTP status the real service uses for Code.
type Fault struct {
	Action  string  `json:"action,omitempty"`
	Code    string  `json:"code"`
	Count   int     `json:"count,omitempty"`
	Rate    float64 `json:"rate,omitempty"`
	Status  int     `json:"status,omitempty"`
	Message string  `json:"message,omitempty"`
}

// Emulator is the emulated ECS/VPC service. Create it with New, serve Handler, Close it.
type Emulator struct {
	cfg     *Config
	log     *zap.Logger
	sdn     SDN
	now     func() time.Time
	seed    uint64
	auth    *authenticator
	actions map[string]map[string]actionFunc
	latency atomic.Int64 // time.Duration per call

	mu       sync.Mutex
	closed   bool
	rng      *rand.Rand
	vpc      netip.Prefix
	types    map[string]InstanceTypeConfig
	vsws     map[string]*vswitch
	vswOrder []string
	insts    map[string]*instance
	instIDs  []string
	enis     map[string]*eni
	eniIDs   []string // creation order, the order Describe lists them in
	macs     map[string]bool
	sgs      map[string]bool
	tokens   map[string]any // action + ClientToken → the reply first sent for it
	calls    map[string]int
	errs     map[string]int
	faults   []Fault
	delays   TransitionDelays
	lag      ListingLag
	holds    []*hold
	requests uint64
	rt       *routeTable
}

type vswitch struct {
	cfg    VSwitchConfig
	prefix netip.Prefix
	gw     netip.Addr
	used   map[netip.Addr]string // address → ENI ID
	// settling holds addresses just unassigned, until the time the VPC has finished releasing
	// them (ListingLag.Reassign): an assign of one of them by name is refused meanwhile.
	settling map[netip.Addr]time.Time
}

type instance struct {
	cfg     InstanceConfig
	typ     InstanceTypeConfig
	primary string // ENI ID
	created time.Time
}

type eni struct {
	id          string
	mac         net.HardwareAddr
	typ         string
	status      string
	instanceID  string
	deviceIndex int    // a member ENI's VLAN id
	trunk       string // a member ENI's trunk ENI while it is attached to one (trunk.go)
	vswitch     *vswitch
	ips         []netip.Addr // ips[0] is the primary
	sgs         []string
	tags        []tag
	name        string
	description string
	created     time.Time
	attachedAt  time.Time
	plugged     bool        // the SDN has the ENI attached
	timer       *time.Timer // pending state transition
	pending     func(*eni)  // what the timer will do
	gen         int         // bumps on every transition, so a stale timer does nothing
	lag         lagState    // what listings still show or do not show yet
}

type tag struct{ Key, Value string }

// New builds an emulator from cfg (validated here) and plugs every instance's primary ENI into
// the SDN.
func New(cfg *Config, opts ...Option) (*Emulator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("emulator config: %w", err)
	}
	cfg = cfg.Clone()
	cfg.applyTiming()
	e := &Emulator{
		cfg:    cfg,
		log:    zap.NewNop(),
		sdn:    NopSDN{},
		now:    time.Now,
		seed:   uint64(time.Now().UnixNano()),
		types:  map[string]InstanceTypeConfig{},
		vsws:   map[string]*vswitch{},
		insts:  map[string]*instance{},
		enis:   map[string]*eni{},
		macs:   map[string]bool{},
		sgs:    map[string]bool{},
		tokens: map[string]any{},
		calls:  map[string]int{},
		errs:   map[string]int{},
		delays: cfg.Delays,
		lag:    cfg.ListingLag,
	}
	for _, o := range opts {
		o(e)
	}
	e.rng = rand.New(rand.NewPCG(e.seed, e.seed^0x9e3779b97f4a7c15))
	skew := time.Duration(cfg.MaxClockSkew)
	if skew == 0 {
		skew = 15 * time.Minute
	}
	e.auth = newAuthenticator(cfg.AccessKeys, skew, e.now)
	e.actions = e.actionTables()
	e.rt = e.newRouteTable()
	e.latency.Store(int64(cfg.Latency))
	e.vpc = netip.MustParsePrefix(cfg.VPC.CIDR)
	for _, t := range cfg.InstanceTypes {
		e.types[t.ID] = t
	}
	for _, sg := range cfg.SecurityGroups {
		e.sgs[sg] = true
	}
	for _, v := range cfg.VSwitches {
		p := netip.MustParsePrefix(v.CIDR)
		e.vsws[v.ID] = &vswitch{cfg: v, prefix: p, gw: gatewayOf(p), used: map[netip.Addr]string{}}
		e.vswOrder = append(e.vswOrder, v.ID)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, ic := range cfg.Instances {
		vs := e.vsws[ic.VSwitchID]
		ip := netip.MustParseAddr(ic.PrimaryIP)
		if owner, taken := vs.used[ip]; taken {
			e.unplugAllLocked()
			return nil, fmt.Errorf("instance %s: primary IP %s is already used by %s", ic.ID, ip, owner)
		}
		if ic.Zone == "" {
			ic.Zone = vs.cfg.Zone
		}
		in := &instance{cfg: ic, typ: e.types[ic.Type], created: e.now()}
		sgs := ic.SecurityGroups
		if len(sgs) == 0 && len(cfg.SecurityGroups) > 0 {
			sgs = cfg.SecurityGroups[:1]
		}
		n := e.newENILocked(vs, TypePrimary, []netip.Addr{ip}, sgs)
		n.status = StatusInUse
		n.instanceID = ic.ID
		n.deviceIndex = 0
		n.attachedAt = n.created
		in.primary = n.id
		e.insts[ic.ID] = in
		e.instIDs = append(e.instIDs, ic.ID)
		if err := e.sdn.AttachENI(e.infoLocked(n)); err != nil {
			e.unplugAllLocked()
			return nil, fmt.Errorf("plug primary ENI of instance %s into the SDN: %w", ic.ID, err)
		}
		n.plugged = true
	}
	return e, nil
}

// newENILocked creates an ENI record with a fresh ID and MAC and takes its addresses from vs.
func (e *Emulator) newENILocked(vs *vswitch, typ string, ips []netip.Addr, sgs []string) *eni {
	n := &eni{
		id:      e.newIDLocked("eni-"),
		mac:     e.newMACLocked(),
		typ:     typ,
		status:  StatusAvailable,
		vswitch: vs,
		ips:     ips,
		sgs:     append([]string(nil), sgs...),
		created: e.now(),
	}
	for _, ip := range ips {
		vs.used[ip] = n.id
	}
	e.enis[n.id] = n
	e.eniIDs = append(e.eniIDs, n.id)
	return n
}

const idAlphabet = "abcdefghijklmnopqrstuvwxyz0123456789"

// newIDLocked makes an ID shaped like Alibaba Cloud's: prefix, a region tag, random tail.
func (e *Emulator) newIDLocked(prefix string) string {
	var b strings.Builder
	b.WriteString(prefix)
	b.WriteString("bp1")
	for range 17 {
		b.WriteByte(idAlphabet[e.rng.IntN(len(idAlphabet))])
	}
	return b.String()
}

// newMACLocked returns a unique MAC in Alibaba Cloud's 00:16:3e OUI.
func (e *Emulator) newMACLocked() net.HardwareAddr {
	for {
		m := net.HardwareAddr{0x00, 0x16, 0x3e, byte(e.rng.IntN(256)), byte(e.rng.IntN(256)), byte(e.rng.IntN(256))}
		if !e.macs[m.String()] {
			e.macs[m.String()] = true
			return m
		}
	}
}

func (e *Emulator) infoLocked(n *eni) ENIInfo {
	info := ENIInfo{
		ID:          n.id,
		InstanceID:  n.instanceID,
		MAC:         append(net.HardwareAddr(nil), n.mac...),
		Primary:     n.typ == TypePrimary,
		DeviceIndex: n.deviceIndex,
		VSwitchCIDR: n.vswitch.prefix,
		Gateway:     n.vswitch.gw,
		IPs:         append([]netip.Addr(nil), n.ips...),
	}
	if t := e.enis[n.trunk]; n.trunk != "" && t != nil {
		info.TrunkID, info.TrunkMAC, info.VLAN = t.id, append(net.HardwareAddr(nil), t.mac...), n.deviceIndex
	}
	return info
}

// InjectFault adds a fault; faults are checked in the order they were added.
func (e *Emulator) InjectFault(f Fault) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.faults = append(e.faults, f)
}

// ClearFaults removes every fault.
func (e *Emulator) ClearFaults() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.faults = nil
}

// SetLatency delays every later OpenAPI call by d.
func (e *Emulator) SetLatency(d time.Duration) { e.latency.Store(int64(d)) }

// SetAccessKeys replaces the accepted keys, as a credential rotation does: calls signed
// with a key no longer listed fail with InvalidAccessKeyId.NotFound from now on.
func (e *Emulator) SetAccessKeys(keys []AccessKey) { e.auth.setKeys(keys) }

// SetDelays changes the ENI and route state-transition delays for later transitions.
func (e *Emulator) SetDelays(d TransitionDelays) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.delays = d
}

// Close stops pending state transitions and unplugs every ENI from the SDN, primary ENIs
// included, so nothing the emulator created outlives it.
func (e *Emulator) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return nil
	}
	e.closed = true
	return e.unplugAllLocked()
}

func (e *Emulator) unplugAllLocked() error {
	var errs []string
	if e.rt != nil {
		errs = append(errs, e.stopRoutesLocked()...)
	}
	for _, id := range e.eniIDs {
		n := e.enis[id]
		if n.timer != nil {
			n.timer.Stop()
			n.timer = nil
		}
		if n.plugged {
			if err := e.sdn.DetachENI(e.infoLocked(n)); err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", n.id, err))
			}
			n.plugged = false
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("unplug ENIs from the SDN: %s", strings.Join(errs, "; "))
	}
	return nil
}

// Handler serves the OpenAPI endpoint at "/", and under /_emulator/: faults (GET lists, POST
// adds a Fault as JSON, DELETE clears), state (GET the Snapshot), latency (POST
// {"latency":"100ms"}) and metadata/<instance-id>/latest/meta-data/... .
func (e *Emulator) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/_emulator/faults", e.serveFaults)
	mux.HandleFunc("/_emulator/state", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, e.Snapshot())
	})
	mux.HandleFunc("/_emulator/latency", e.serveLatency)
	mux.HandleFunc("/_emulator/metadata/", func(w http.ResponseWriter, r *http.Request) {
		rest := strings.TrimPrefix(r.URL.Path, "/_emulator/metadata/")
		id, path, _ := strings.Cut(rest, "/")
		r2 := r.Clone(r.Context())
		r2.URL.Path = "/" + path
		e.MetadataHandler(id).ServeHTTP(w, r2)
	})
	mux.HandleFunc("/", e.serveAPI)
	return mux
}

func (e *Emulator) serveFaults(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet:
		e.mu.Lock()
		fs := append([]Fault{}, e.faults...)
		e.mu.Unlock()
		writeJSON(w, http.StatusOK, fs)
	case http.MethodPost:
		var f Fault
		if err := json.NewDecoder(r.Body).Decode(&f); err != nil || f.Code == "" || f.Rate < 0 || f.Rate > 1 {
			http.Error(w, `want a JSON Fault such as {"action":"AssignPrivateIpAddresses","code":"Throttling","count":2,"rate":0.3}`, http.StatusBadRequest)
			return
		}
		e.InjectFault(f)
		w.WriteHeader(http.StatusNoContent)
	case http.MethodDelete:
		e.ClearFaults()
		w.WriteHeader(http.StatusNoContent)
	default:
		http.Error(w, "use GET, POST or DELETE", http.StatusMethodNotAllowed)
	}
}

func (e *Emulator) serveLatency(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		writeJSON(w, http.StatusOK, map[string]string{"latency": time.Duration(e.latency.Load()).String()})
		return
	}
	var body struct {
		Latency Duration `json:"latency"`
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		http.Error(w, `want {"latency":"100ms"}`, http.StatusBadRequest)
		return
	}
	e.SetLatency(time.Duration(body.Latency))
	w.WriteHeader(http.StatusNoContent)
}

// serveAPI handles one OpenAPI call: parameters from the query and a form body, latency,
// authentication, faults, then the action.
func (e *Emulator) serveAPI(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/" {
		http.NotFound(w, r)
		return
	}
	reqID := e.requestID()
	if err := r.ParseForm(); err != nil {
		e.writeError(w, reqID, "", apiErr(http.StatusBadRequest, CodeInvalidParameter, "cannot parse the request parameters: %v", err))
		return
	}
	p := make(map[string]string, len(r.Form))
	for k, vs := range r.Form {
		if len(vs) > 0 {
			p[k] = vs[0]
		}
	}
	action := p["Action"]
	if d := time.Duration(e.latency.Load()); d > 0 {
		if !sleepCtx(r.Context(), d) {
			return
		}
	}
	if aerr := e.auth.check(r.Method, p); aerr != nil {
		e.count(action, aerr)
		e.writeError(w, reqID, action, aerr)
		return
	}
	handler, aerr := e.route(p["Version"], action)
	if aerr == nil {
		aerr = e.fault(action)
	}
	var reply any
	if aerr == nil {
		reply, aerr = handler(p)
	}
	e.count(action, aerr)
	if aerr != nil {
		e.writeError(w, reqID, action, aerr)
		return
	}
	e.mu.Lock()
	h, held := e.takeHoldLocked(action, p, reply)
	e.mu.Unlock()
	if h != nil {
		h.held <- held
		select {
		case <-h.release:
		case <-r.Context().Done():
			e.log.Info("reply lost: the client went away while it was held", zap.String("action", action), zap.String("eni", held.ENIID))
			return
		}
	}
	b, err := json.Marshal(reply)
	if err != nil {
		e.writeError(w, reqID, action, apiErr(http.StatusInternalServerError, CodeInternalError, "encode reply: %v", err))
		return
	}
	// Every reply carries RequestId at top level; splice it into the action's object.
	var obj map[string]any
	_ = json.Unmarshal(b, &obj)
	if obj == nil {
		obj = map[string]any{}
	}
	obj["RequestId"] = reqID
	e.log.Debug("openapi call", zap.String("action", action), zap.String("requestId", reqID))
	writeJSON(w, http.StatusOK, obj)
}

// actionFunc runs one API action on its parameters.
type actionFunc func(map[string]string) (any, *APIError)

// actionTables maps API version → action name → implementation.
func (e *Emulator) actionTables() map[string]map[string]actionFunc {
	ecs := map[string]actionFunc{
		"DescribeInstanceTypes":      e.describeInstanceTypes,
		"DescribeInstances":          e.describeInstances,
		"DescribeInstanceAttribute":  e.describeInstanceAttribute,
		"DescribeNetworkInterfaces":  e.describeNetworkInterfaces,
		"CreateNetworkInterface":     e.createNetworkInterface,
		"AttachNetworkInterface":     e.attachNetworkInterface,
		"DetachNetworkInterface":     e.detachNetworkInterface,
		"DeleteNetworkInterface":     e.deleteNetworkInterface,
		"AssignPrivateIpAddresses":   e.assignPrivateIPAddresses,
		"UnassignPrivateIpAddresses": e.unassignPrivateIPAddresses,
	}
	vpc := map[string]actionFunc{
		"DescribeVSwitches":      e.describeVSwitches,
		"CreateRouteEntry":       e.createRouteEntry,
		"DeleteRouteEntry":       e.deleteRouteEntry,
		"DescribeRouteTables":    e.describeRouteTables,
		"DescribeRouteTableList": e.describeRouteTableList,
		"DescribeRouteEntryList": e.describeRouteEntryList,
	}
	return map[string]map[string]actionFunc{ECSVersion: ecs, VPCVersion: vpc}
}

func (e *Emulator) route(version, action string) (actionFunc, *APIError) {
	table, ok := e.actions[version]
	switch {
	case ok:
	case version == "":
		return nil, apiErr(http.StatusBadRequest, CodeMissingParameter, "The input parameter \"Version\" that is mandatory for processing this request is not supplied.")
	default:
		return nil, apiErr(http.StatusBadRequest, CodeUnsupportedVersion, "Version %q is not supported; ECS uses %s and VPC %s.", version, ECSVersion, VPCVersion)
	}
	h, ok := table[action]
	if !ok {
		return nil, apiErr(http.StatusNotFound, CodeInvalidAction, "Specified api %q is not found for version %s.", action, version)
	}
	return h, nil
}

// fault returns the error of the first fault that fires for action, if any.
func (e *Emulator) fault(action string) *APIError {
	e.mu.Lock()
	defer e.mu.Unlock()
	for i := range e.faults {
		f := &e.faults[i]
		if f.Action != "" && f.Action != action {
			continue
		}
		if f.Rate > 0 && e.rng.Float64() >= f.Rate {
			continue
		}
		status := f.Status
		if status == 0 {
			status = statusOf(f.Code)
		}
		msg := f.Message
		if msg == "" {
			msg = "injected fault: " + f.Code
		}
		out := &APIError{Status: status, Code: f.Code, Message: msg}
		if f.Count > 0 {
			f.Count--
			if f.Count == 0 {
				// f points into the slice: it names the next fault once this one is cut out.
				e.faults = append(e.faults[:i], e.faults[i+1:]...)
			}
		}
		return out
	}
	return nil
}

func (e *Emulator) count(action string, aerr *APIError) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if action == "" {
		action = "(none)"
	}
	e.calls[action]++
	if aerr != nil {
		e.errs[aerr.Code]++
	}
}

func (e *Emulator) requestID() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.requests++
	return fmt.Sprintf("E2C0A1B2-%04X-4E5F-8A9B-%012X", e.rng.IntN(1<<16), e.requests)
}

func (e *Emulator) writeError(w http.ResponseWriter, reqID, action string, aerr *APIError) {
	e.log.Info("openapi call failed", zap.String("action", action), zap.String("code", aerr.Code),
		zap.Int("status", aerr.Status), zap.String("requestId", reqID))
	writeJSON(w, aerr.Status, map[string]string{
		"RequestId": reqID,
		"HostId":    "ecs.aliyuncs.com",
		"Code":      aerr.Code,
		"Message":   aerr.Message,
		"Recommend": "https://api.aliyun.com/troubleshoot?q=" + aerr.Code,
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json;charset=utf-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// State is a deep copy of the emulator's state, for assertions and /_emulator/state.
type State struct {
	ENIs      []ENIState        `json:"enis"`
	VSwitches []VSwitchState    `json:"vSwitches"`
	Instances []InstanceInfo    `json:"instances"`
	Routes    []RouteEntryState `json:"routes"` // custom entries of the VPC route table
	Calls     map[string]int    `json:"calls"`  // per action, failed calls included
	Errors    map[string]int    `json:"errors"` // per error code
	Faults    []Fault           `json:"faults"`
}

// ENIState is one ENI in a State.
type ENIState struct {
	ID             string            `json:"id"`
	MAC            string            `json:"mac"`
	Type           string            `json:"type"`
	Status         string            `json:"status"`
	InstanceID     string            `json:"instanceId,omitempty"`
	DeviceIndex    int               `json:"deviceIndex"`
	VSwitchID      string            `json:"vSwitchId"`
	ZoneID         string            `json:"zoneId"`
	PrimaryIP      string            `json:"primaryIp"`
	IPs            []string          `json:"ips"` // primary first
	SecurityGroups []string          `json:"securityGroups"`
	Tags           map[string]string `json:"tags,omitempty"`
	Plugged        bool              `json:"plugged"`         // attached in the SDN
	Trunk          string            `json:"trunk,omitempty"` // a member ENI's trunk ENI; DeviceIndex is its VLAN id
}

// VSwitchState is one vSwitch in a State.
type VSwitchState struct {
	ID        string `json:"id"`
	Zone      string `json:"zone"`
	CIDR      string `json:"cidr"`
	Gateway   string `json:"gateway"`
	Available int    `json:"available"`
}

// InstanceInfo is one instance in a State.
type InstanceInfo struct {
	ID         string `json:"id"`
	Type       string `json:"type"`
	Zone       string `json:"zone"`
	VSwitchID  string `json:"vSwitchId"`
	PrimaryIP  string `json:"primaryIp"`
	PrimaryENI string `json:"primaryEni"`
}

// Snapshot returns a deep copy of the current state.
func (e *Emulator) Snapshot() State {
	e.mu.Lock()
	defer e.mu.Unlock()
	s := State{Calls: map[string]int{}, Errors: map[string]int{}, Faults: append([]Fault{}, e.faults...)}
	for _, id := range e.eniIDs {
		n := e.enis[id]
		es := ENIState{
			ID: n.id, MAC: n.mac.String(), Type: n.typeIn(n.currentView()), Status: n.status, Trunk: n.trunk, InstanceID: n.instanceID,
			DeviceIndex: n.deviceIndex, VSwitchID: n.vswitch.cfg.ID, ZoneID: n.vswitch.cfg.Zone,
			PrimaryIP: n.ips[0].String(), SecurityGroups: append([]string{}, n.sgs...), Plugged: n.plugged,
		}
		for _, ip := range n.ips {
			es.IPs = append(es.IPs, ip.String())
		}
		if len(n.tags) > 0 {
			es.Tags = map[string]string{}
			for _, t := range n.tags {
				es.Tags[t.Key] = t.Value
			}
		}
		s.ENIs = append(s.ENIs, es)
	}
	for _, id := range e.vswOrder {
		v := e.vsws[id]
		s.VSwitches = append(s.VSwitches, VSwitchState{
			ID: id, Zone: v.cfg.Zone, CIDR: v.prefix.String(), Gateway: v.gw.String(),
			Available: usableCount(v.prefix) - len(v.used),
		})
	}
	for _, id := range e.instIDs {
		in := e.insts[id]
		s.Instances = append(s.Instances, InstanceInfo{
			ID: id, Type: in.cfg.Type, Zone: in.cfg.Zone, VSwitchID: in.cfg.VSwitchID,
			PrimaryIP: in.cfg.PrimaryIP, PrimaryENI: in.primary,
		})
	}
	s.Routes = e.routeStatesLocked()
	for k, v := range e.calls {
		s.Calls[k] = v
	}
	for k, v := range e.errs {
		s.Errors[k] = v
	}
	return s
}

// ENI returns the state of one ENI, and whether it exists.
func (s State) ENI(id string) (ENIState, bool) {
	for _, n := range s.ENIs {
		if n.ID == id {
			return n, true
		}
	}
	return ENIState{}, false
}

// VSwitch returns the state of one vSwitch, and whether it exists.
func (s State) VSwitch(id string) (VSwitchState, bool) {
	for _, v := range s.VSwitches {
		if v.ID == id {
			return v, true
		}
	}
	return VSwitchState{}, false
}
