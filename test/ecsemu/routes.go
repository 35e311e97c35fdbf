package ecsemu

import (
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
)

// VPC route tables. The emulator's VPC has one route table, the system table of its vRouter,
// as every VPC starts with. It lists a System entry per vSwitch and the Custom entries
// CreateRouteEntry adds. What the emulator takes from the CreateRouteEntry reference (VPC
// API 2016-04-28, "错误码" table and usage notes):
//
//   - a route table holds at most 48 custom entries (RouteEntryQuota; the quota can be raised
//     in the console), past that QuotaExceeded (HTTP 400);
//   - a destination may not equal, contain or lie inside a vSwitch CIDR of the VPC, nor touch
//     100.64.0.0/10: InvalidCidrBlock (400);
//   - one destination per table: InvalidCIDRBlock.Duplicate (400);
//   - while any entry of the table is Pending (or being deleted), creates and deletes fail
//     with IncorrectRouteEntryStatus (400) — the reason Terraform's provider retries it;
//   - a new entry is Pending and turns Available asynchronously (TransitionDelays.Route);
//     only then does the SDN forward the destination to the next hop.
//
// A deleted entry stays listed as "Deleting" (an emulator name: the documented statuses are
// Pending, Available and Modifying) for TransitionDelays.RouteDelete, and the route goes
// from the SDN when it is gone.
//
// The listings are eventually consistent when ListingLag.Routes is set: they show the table
// as it was that long ago (each entry keeps its status history, and a removed entry is kept
// for the listings until the lag has passed). The calls that change the table act on the
// true one.

// Route entry statuses and types.
const (
	RouteStatusPending   = "Pending"
	RouteStatusAvailable = "Available"
	RouteStatusDeleting  = "Deleting"

	RouteTypeSystem = "System"
	RouteTypeCustom = "Custom"

	NextHopInstance = "Instance"
)

// DefaultRouteEntryQuota is the documented number of custom entries per route table.
const DefaultRouteEntryQuota = 48

// Route-table error codes, as the VPC API names them.
const (
	CodeRouteQuotaExceeded     = "QuotaExceeded"
	CodeRouteCIDRDuplicate     = "InvalidCIDRBlock.Duplicate"
	CodeRouteInvalidCIDR       = "InvalidCidrBlock"
	CodeRouteCIDRMalformed     = "InvalidCidrBlock.Malformed"
	CodeIncorrectRouteStatus   = "IncorrectRouteEntryStatus"
	CodeRouteTableNotFound     = "InvalidRouteTableId.NotFound"
	CodeRouteEntryNotFound     = "InvalidRouteEntry.NotFound"
	CodeNextHopNotFound        = "InvalidNextHopId.NotFound"
	CodeInvalidNextHopType     = "InvalidNextHopType"
	CodeRouteOperationDenied   = "OperationDenied"
	sharedAddressSpace         = "100.64.0.0/10"
	routeEntryReplyTokenPrefix = "CreateRouteEntry/"
)

// RouteSDN is implemented by an SDN that can forward a destination CIDR to an instance, the
// data plane of a custom route entry whose next hop is an ECS instance.
type RouteSDN interface {
	// AddRoute forwards dst to the instance behind its primary ENI via.
	AddRoute(dst netip.Prefix, via ENIInfo) error
	// DelRoute stops forwarding dst; a route already gone is not an error.
	DelRoute(dst netip.Prefix) error
}

type routeTable struct {
	id, vrouterID string
	entries       []*routeEntry // custom entries in creation order
	// removed are entries gone from the table that a lagging listing still shows.
	removed []*routeEntry
}

type routeStatusAt struct {
	status string
	from   time.Time
}

type routeEntry struct {
	id          string
	dst         netip.Prefix
	nextHopType string
	nextHopID   string
	name        string
	description string
	status      string
	created     time.Time
	// history is the entry's statuses and since when, oldest first, as far back as a
	// lagging listing can look; removedAt is when it left the table (zero while in it).
	history   []routeStatusAt
	removedAt time.Time
	installed bool // the SDN forwards dst
	timer     *time.Timer
	gen       int
}

func (e *Emulator) newRouteTable() *routeTable {
	tail := strings.TrimPrefix(e.cfg.VPC.ID, "vpc-")
	id := e.cfg.VPC.RouteTableID
	if id == "" {
		id = "vtb-" + tail
	}
	return &routeTable{id: id, vrouterID: "vrt-" + tail}
}

func (e *Emulator) routeQuota() int {
	if e.cfg.RouteEntryQuota > 0 {
		return e.cfg.RouteEntryQuota
	}
	return DefaultRouteEntryQuota
}

type wireNextHop struct {
	NextHopID   string `json:"NextHopId"`
	NextHopType string `json:"NextHopType"`
	Enabled     int    `json:"Enabled"`
	Weight      int    `json:"Weight"`
}

type wireRouteEntry struct {
	RouteEntryID         string `json:"RouteEntryId"`
	RouteEntryName       string `json:"RouteEntryName"`
	RouteTableID         string `json:"RouteTableId"`
	Description          string `json:"Description"`
	DestinationCidrBlock string `json:"DestinationCidrBlock"`
	Type                 string `json:"Type"`
	Status               string `json:"Status"`
	NextHopType          string `json:"NextHopType"`
	InstanceID           string `json:"InstanceId"`
	IPVersion            string `json:"IpVersion"`
	Origin               string `json:"Origin,omitempty"`
	CreationTime         string `json:"CreationTime,omitempty"`
	NextHops             struct {
		NextHop []wireNextHop `json:"NextHop"`
	} `json:"NextHops"`
}

// setStatusLocked changes r's status and remembers the change for lagging listings.
func (e *Emulator) setStatusLocked(r *routeEntry, status string) {
	now := e.now()
	r.status = status
	r.history = append(r.history, routeStatusAt{status: status, from: now})
	// Forget statuses no listing can show any more: keep the last one that began before the
	// lag's horizon.
	cut := now.Add(-time.Duration(e.lag.Routes))
	for len(r.history) > 1 && !r.history[1].from.After(cut) {
		r.history = r.history[1:]
	}
}

// listedStatusLocked is r's status as a listing sees it now (the status it had
// ListingLag.Routes ago); ok is false when the listing does not show r.
func (e *Emulator) listedStatusLocked(r *routeEntry) (status string, ok bool) {
	cut := e.now().Add(-time.Duration(e.lag.Routes))
	if r.created.After(cut) || (!r.removedAt.IsZero() && !r.removedAt.After(cut)) {
		return "", false
	}
	status = r.status
	for _, h := range r.history {
		if !h.from.After(cut) {
			status = h.status
		}
	}
	return status, true
}

// listedRoute is a custom entry as a listing shows it.
type listedRoute struct {
	*routeEntry
	listedStatus string
}

// listedEntriesLocked are the custom entries a listing shows now, in creation order, with the
// status it shows; it drops removed entries the lag no longer covers.
func (e *Emulator) listedEntriesLocked() []listedRoute {
	cut := e.now().Add(-time.Duration(e.lag.Routes))
	e.rt.removed = slices.DeleteFunc(e.rt.removed, func(r *routeEntry) bool { return !r.removedAt.After(cut) })
	all := slices.Concat(e.rt.entries, e.rt.removed)
	slices.SortStableFunc(all, func(a, b *routeEntry) int { return a.created.Compare(b.created) })
	var out []listedRoute
	for _, r := range all {
		if st, ok := e.listedStatusLocked(r); ok {
			out = append(out, listedRoute{r, st})
		}
	}
	return out
}

// ListedRoutes is the route table as DescribeRouteEntryList shows it now (lagging by
// ListingLag.Routes), for tests that must wait until the listing caught up with a change.
func (e *Emulator) ListedRoutes() []RouteEntryState {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := []RouteEntryState{}
	for _, r := range e.listedEntriesLocked() {
		out = append(out, RouteEntryState{ID: r.id, Destination: r.dst.String(), NextHopType: r.nextHopType,
			NextHopID: r.nextHopID, Name: r.name, Status: r.listedStatus, Installed: r.installed})
	}
	return out
}

// entriesLocked is the table as listings show it: System entries for the vSwitches, then the
// custom ones (lagging by ListingLag.Routes).
func (e *Emulator) entriesLocked() []wireRouteEntry {
	var out []wireRouteEntry
	for _, id := range e.vswOrder {
		v := e.vsws[id]
		w := wireRouteEntry{RouteEntryID: "rte-sys-" + strings.TrimPrefix(id, "vsw-"), RouteTableID: e.rt.id,
			DestinationCidrBlock: v.prefix.String(), Type: RouteTypeSystem, Status: RouteStatusAvailable,
			NextHopType: "local", IPVersion: "ipv4", Origin: "RouteTable"}
		w.NextHops.NextHop = []wireNextHop{}
		out = append(out, w)
	}
	for _, r := range e.listedEntriesLocked() {
		w := wireRouteEntry{RouteEntryID: r.id, RouteEntryName: r.name, RouteTableID: e.rt.id, Description: r.description,
			DestinationCidrBlock: r.dst.String(), Type: RouteTypeCustom, Status: r.listedStatus, NextHopType: r.nextHopType,
			InstanceID: r.nextHopID, IPVersion: "ipv4", Origin: "RouteTable", CreationTime: r.created.UTC().Format(timeLayout)}
		w.NextHops.NextHop = []wireNextHop{{NextHopID: r.nextHopID, NextHopType: r.nextHopType, Enabled: 1, Weight: 100}}
		out = append(out, w)
	}
	return out
}

// checkTableLocked answers InvalidRouteTableId.NotFound for any table but the VPC's.
func (e *Emulator) checkTableLocked(id string) *APIError {
	if id != e.rt.id {
		return apiErr(http.StatusNotFound, CodeRouteTableNotFound, "Specified route table %q does not exist.", id)
	}
	return nil
}

// unstableLocked reports an entry whose status blocks changes to the table.
func (e *Emulator) unstableLocked() *routeEntry {
	for _, r := range e.rt.entries {
		if r.status != RouteStatusAvailable {
			return r
		}
	}
	return nil
}

func (e *Emulator) createRouteEntry(p map[string]string) (any, *APIError) {
	if aerr := required(p, "RouteTableId", "DestinationCidrBlock"); aerr != nil {
		return nil, aerr
	}
	dst, err := netip.ParsePrefix(p["DestinationCidrBlock"])
	if err != nil {
		a, aerr := netip.ParseAddr(p["DestinationCidrBlock"])
		if aerr != nil || !a.Is4() {
			return nil, apiErr(http.StatusBadRequest, CodeRouteCIDRMalformed, "Specified CIDR block %q is not valid.", p["DestinationCidrBlock"])
		}
		dst = netip.PrefixFrom(a, 32) // an address is taken as a /32
	}
	if !dst.Addr().Is4() {
		return nil, apiErr(http.StatusBadRequest, CodeRouteCIDRMalformed, "Specified CIDR block %q is not valid (IPv4 only here).", p["DestinationCidrBlock"])
	}
	dst = dst.Masked()
	typ := p["NextHopType"]
	if typ == "" {
		typ = NextHopInstance // the documented default
	}
	if typ != NextHopInstance {
		return nil, apiErr(http.StatusBadRequest, CodeInvalidNextHopType, "Specified parameter \"NextHopType\" %q is not valid here; the emulator supports Instance.", typ)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	tokenKey := ""
	if t := p["ClientToken"]; t != "" {
		tokenKey = routeEntryReplyTokenPrefix + t
		if prev, ok := e.tokens[tokenKey]; ok {
			return prev, nil
		}
	}
	if aerr := e.checkTableLocked(p["RouteTableId"]); aerr != nil {
		return nil, aerr
	}
	in, ok := e.insts[p["NextHopId"]]
	if !ok {
		return nil, apiErr(http.StatusNotFound, CodeNextHopNotFound, "Specified next hop %q does not exist.", p["NextHopId"])
	}
	shared := netip.MustParsePrefix(sharedAddressSpace)
	if dst.Overlaps(shared) {
		return nil, apiErr(http.StatusBadRequest, CodeRouteInvalidCIDR, "Specified CIDR block %s is not valid: it may not touch %s.", dst, shared)
	}
	for _, id := range e.vswOrder {
		if v := e.vsws[id]; v.prefix.Overlaps(dst) {
			return nil, apiErr(http.StatusBadRequest, CodeRouteInvalidCIDR,
				"Specified CIDR block %s is not valid: it overlaps vSwitch %s (%s) of the VPC.", dst, id, v.prefix)
		}
	}
	for _, r := range e.rt.entries {
		if r.dst == dst {
			return nil, apiErr(http.StatusBadRequest, CodeRouteCIDRDuplicate, "Specified CIDR block %s already exists in route table %s (entry %s).", dst, e.rt.id, r.id)
		}
	}
	if r := e.unstableLocked(); r != nil {
		return nil, apiErr(http.StatusBadRequest, CodeIncorrectRouteStatus, "Some route entry status blocked this operation: entry %s (%s) is %s.", r.id, r.dst, r.status)
	}
	if len(e.rt.entries) >= e.routeQuota() {
		return nil, apiErr(http.StatusBadRequest, CodeRouteQuotaExceeded, "Route entry quota exceeded in this route table: %d custom entries, the limit.", len(e.rt.entries))
	}
	r := &routeEntry{id: e.newIDLocked("rte-"), dst: dst, nextHopType: typ, nextHopID: in.cfg.ID,
		name: p["RouteEntryName"], description: p["Description"], created: e.now()}
	e.setStatusLocked(r, RouteStatusPending)
	e.rt.entries = append(e.rt.entries, r)
	e.scheduleRouteLocked(r, time.Duration(e.delays.Route), e.finishRouteCreateLocked)
	reply := map[string]any{"RouteEntryId": r.id}
	if tokenKey != "" {
		e.tokens[tokenKey] = reply
	}
	e.log.Info("route entry created", zap.String("entry", r.id), zap.Stringer("dst", dst), zap.String("nextHop", r.nextHopID))
	return reply, nil
}

func (e *Emulator) finishRouteCreateLocked(r *routeEntry) {
	if sdn, ok := e.sdn.(RouteSDN); ok {
		in := e.insts[r.nextHopID]
		if err := sdn.AddRoute(r.dst, e.infoLocked(e.enis[in.primary])); err != nil {
			// The entry turns Available all the same: the cloud has no such failure mode,
			// and the test that depends on forwarding will see it.
			e.log.Error("SDN could not install a route entry", zap.String("entry", r.id), zap.Error(err))
		} else {
			r.installed = true
		}
	}
	e.setStatusLocked(r, RouteStatusAvailable)
	e.log.Info("route entry available", zap.String("entry", r.id), zap.Stringer("dst", r.dst))
}

func (e *Emulator) deleteRouteEntry(p map[string]string) (any, *APIError) {
	e.mu.Lock()
	defer e.mu.Unlock()
	var r *routeEntry
	switch {
	case p["RouteEntryId"] != "":
		for _, x := range e.rt.entries {
			if x.id == p["RouteEntryId"] {
				r = x
			}
		}
		if r == nil && strings.HasPrefix(p["RouteEntryId"], "rte-sys-") {
			return nil, apiErr(http.StatusBadRequest, CodeRouteOperationDenied, "Specified operation is denied as route entry type is system.")
		}
	case p["RouteTableId"] != "" && p["DestinationCidrBlock"] != "":
		if aerr := e.checkTableLocked(p["RouteTableId"]); aerr != nil {
			return nil, aerr
		}
		dst, err := netip.ParsePrefix(p["DestinationCidrBlock"])
		if err != nil {
			return nil, apiErr(http.StatusBadRequest, CodeRouteCIDRMalformed, "Specified CIDR block %q is not valid.", p["DestinationCidrBlock"])
		}
		for _, x := range e.rt.entries {
			if x.dst == dst.Masked() && (p["NextHopId"] == "" || p["NextHopId"] == x.nextHopID) {
				r = x
			}
		}
	default:
		return nil, apiErr(http.StatusBadRequest, CodeMissingParameter, "Set RouteEntryId, or RouteTableId with DestinationCidrBlock (and NextHopId).")
	}
	if r == nil {
		return nil, apiErr(http.StatusBadRequest, CodeRouteEntryNotFound, "Route entry not exists.")
	}
	if u := e.unstableLocked(); u != nil {
		return nil, apiErr(http.StatusBadRequest, CodeIncorrectRouteStatus, "Some route entry status blocked this operation: entry %s (%s) is %s.", u.id, u.dst, u.status)
	}
	e.setStatusLocked(r, RouteStatusDeleting)
	e.scheduleRouteLocked(r, time.Duration(e.delays.RouteDelete), e.finishRouteDeleteLocked)
	e.log.Info("route entry deleting", zap.String("entry", r.id), zap.Stringer("dst", r.dst))
	return map[string]any{}, nil
}

func (e *Emulator) finishRouteDeleteLocked(r *routeEntry) {
	if r.installed {
		if sdn, ok := e.sdn.(RouteSDN); ok {
			if err := sdn.DelRoute(r.dst); err != nil {
				e.log.Error("SDN could not remove a route entry", zap.String("entry", r.id), zap.Error(err))
			}
		}
		r.installed = false
	}
	e.rt.entries = slices.DeleteFunc(e.rt.entries, func(x *routeEntry) bool { return x == r })
	if e.lag.Routes > 0 {
		r.removedAt = e.now()
		e.rt.removed = append(e.rt.removed, r)
	}
	e.log.Info("route entry deleted", zap.String("entry", r.id), zap.Stringer("dst", r.dst))
}

// scheduleRouteLocked runs finish after d (now when d is 0) under the state lock, unless a
// later transition or Close cancels it.
func (e *Emulator) scheduleRouteLocked(r *routeEntry, d time.Duration, finish func(*routeEntry)) {
	if r.timer != nil {
		r.timer.Stop()
		r.timer = nil
	}
	r.gen++
	if d <= 0 {
		finish(r)
		return
	}
	gen := r.gen
	r.timer = time.AfterFunc(d, func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		if e.closed || r.gen != gen {
			return
		}
		r.timer = nil
		finish(r)
	})
}

func (e *Emulator) describeRouteEntryList(p map[string]string) (any, *APIError) {
	if aerr := required(p, "RouteTableId"); aerr != nil {
		return nil, aerr
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if aerr := e.checkTableLocked(p["RouteTableId"]); aerr != nil {
		return nil, aerr
	}
	dsts := listParam(p, "DestCidrBlockList")
	if d := p["DestinationCidrBlock"]; d != "" {
		dsts = append(dsts, d)
	}
	var match []wireRouteEntry
	for _, w := range e.entriesLocked() {
		if (len(dsts) > 0 && !slices.Contains(dsts, w.DestinationCidrBlock)) ||
			(p["RouteEntryId"] != "" && p["RouteEntryId"] != w.RouteEntryID) ||
			(p["RouteEntryName"] != "" && p["RouteEntryName"] != w.RouteEntryName) ||
			(p["RouteEntryType"] != "" && p["RouteEntryType"] != w.Type) ||
			(p["NextHopId"] != "" && p["NextHopId"] != w.InstanceID) ||
			(p["NextHopType"] != "" && p["NextHopType"] != w.NextHopType) {
			continue
		}
		match = append(match, w)
	}
	// DescribeRouteEntryList pages by token only (MaxResult, NextToken).
	q := map[string]string{"NextToken": p["NextToken"], "MaxResults": p["MaxResult"]}
	win, aerr := paginate(q, len(match), 50, 100)
	if aerr != nil {
		return nil, aerr
	}
	return map[string]any{
		"RouteEntrys": map[string]any{"RouteEntry": nonNil(match[win.from:win.to])},
		"NextToken":   win.nextToken,
	}, nil
}

func (e *Emulator) describeRouteTables(p map[string]string) (any, *APIError) {
	e.mu.Lock()
	defer e.mu.Unlock()
	var tables []map[string]any
	if (p["RouteTableId"] == "" || p["RouteTableId"] == e.rt.id) &&
		(p["VRouterId"] == "" || p["VRouterId"] == e.rt.vrouterID) &&
		(p["RouterId"] == "" || p["RouterId"] == e.rt.vrouterID) &&
		(p["Type"] == "" || p["Type"] == RouteTypeSystem) {
		tables = append(tables, map[string]any{
			"RouteTableId": e.rt.id, "VRouterId": e.rt.vrouterID, "RouteTableType": RouteTypeSystem,
			"Status": "Available", "CreationTime": e.now().UTC().Format(timeLayout),
			"RouteEntrys": map[string]any{"RouteEntry": nonNil(e.entriesLocked())},
		})
	}
	win, aerr := paginate(p, len(tables), 10, 50)
	if aerr != nil {
		return nil, aerr
	}
	return map[string]any{
		"RouteTables": map[string]any{"RouteTable": nonNil(tables[win.from:win.to])},
		"TotalCount":  len(tables), "PageNumber": win.pageNumber, "PageSize": win.pageSize,
	}, nil
}

func (e *Emulator) describeRouteTableList(p map[string]string) (any, *APIError) {
	e.mu.Lock()
	defer e.mu.Unlock()
	var tables []map[string]any
	if (p["VpcId"] == "" || p["VpcId"] == e.cfg.VPC.ID) &&
		(p["RouteTableId"] == "" || p["RouteTableId"] == e.rt.id) &&
		(p["RouterId"] == "" || p["RouterId"] == e.rt.vrouterID) &&
		(p["RouteTableType"] == "" || p["RouteTableType"] == RouteTypeSystem) {
		tables = append(tables, map[string]any{
			"RouteTableId": e.rt.id, "RouterId": e.rt.vrouterID, "RouterType": "VRouter", "VpcId": e.cfg.VPC.ID,
			"RouteTableType": RouteTypeSystem, "Status": "Available", "CreationTime": e.now().UTC().Format(timeLayout),
			"VSwitchIds": map[string]any{"VSwitchId": slices.Clone(e.vswOrder)},
		})
	}
	win, aerr := paginate(p, len(tables), 10, 50)
	if aerr != nil {
		return nil, aerr
	}
	return map[string]any{
		"RouterTableList": map[string]any{"RouterTableListType": nonNil(tables[win.from:win.to])},
		"TotalCount":      len(tables), "PageNumber": win.pageNumber, "PageSize": win.pageSize, "Success": true,
	}, nil
}

// RouteEntryState is one custom route entry in a State.
type RouteEntryState struct {
	ID          string `json:"id"`
	Destination string `json:"destination"`
	NextHopType string `json:"nextHopType"`
	NextHopID   string `json:"nextHopId"`
	Name        string `json:"name,omitempty"`
	Status      string `json:"status"`
	Installed   bool   `json:"installed"` // forwarded by the SDN
}

func (e *Emulator) routeStatesLocked() []RouteEntryState {
	out := []RouteEntryState{}
	for _, r := range e.rt.entries {
		out = append(out, RouteEntryState{ID: r.id, Destination: r.dst.String(), NextHopType: r.nextHopType,
			NextHopID: r.nextHopID, Name: r.name, Status: r.status, Installed: r.installed})
	}
	return out
}

// RouteTableID is the ID of the VPC's route table.
func (e *Emulator) RouteTableID() string { return e.rt.id }

// stopRoutesLocked cancels pending route transitions and removes installed routes from the SDN.
func (e *Emulator) stopRoutesLocked() []string {
	var errs []string
	sdn, _ := e.sdn.(RouteSDN)
	for _, r := range e.rt.entries {
		if r.timer != nil {
			r.timer.Stop()
			r.timer = nil
		}
		if r.installed && sdn != nil {
			if err := sdn.DelRoute(r.dst); err != nil {
				errs = append(errs, r.id+": "+err.Error())
			}
			r.installed = false
		}
	}
	return errs
}

// DeleteRouteEntryNow removes a custom entry at once, route included, as if someone deleted it
// in the console and the deletion had finished: tests use it to take a node's route away
// without going through the API (and its injected faults).
func (e *Emulator) DeleteRouteEntryNow(id string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, r := range e.rt.entries {
		if r.id == id {
			if r.timer != nil {
				r.timer.Stop()
				r.timer = nil
			}
			r.gen++
			e.finishRouteDeleteLocked(r)
			return nil
		}
	}
	return fmt.Errorf("route entry %s does not exist", id)
}
