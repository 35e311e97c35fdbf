package ecsemu

import (
	"net/netip"
	"slices"
	"sync"
	"time"
)

// ListingLag makes DescribeNetworkInterfaces (and the ENI list of DescribeInstances), and with
// Routes DescribeRouteEntryList and DescribeRouteTables, eventually
// consistent, as the real API is: it documents no read-after-write guarantee, and its
// AssignPrivateIpAddresses page says to take the new addresses from the call's response. The
// mutating calls and their replies always act on the true state; only the listings lag.
// Zero durations mean no lag.
type ListingLag struct {
	// Assigned is how long an address assigned by AssignPrivateIpAddresses or created with an
	// ENI by CreateNetworkInterface stays missing from the listing.
	Assigned Duration `json:"assigned,omitempty"`
	// Unassigned is how long an address removed by UnassignPrivateIpAddresses is still listed.
	Unassigned Duration `json:"unassigned,omitempty"`
	// Status is how long the listing keeps showing an ENI's previous status and attachment
	// after a change (Available → Attaching → InUse → Detaching → Available → Deleting).
	Status Duration `json:"status,omitempty"`
	// Reassign is how long an address removed by UnassignPrivateIpAddresses stays busy in its
	// vSwitch for an assign that names it (PrivateIpAddress.N): such an assign answers
	// InvalidPrivateIpAddress.Duplicated meanwhile, as an address still held elsewhere does.
	// The address moving between ENIs (a fixed pod IP following its pod to another node) sees
	// this. An assign by count does not pick it meanwhile either.
	Reassign Duration `json:"reassign,omitempty"`
	// Routes is how far DescribeRouteEntryList (and the entries DescribeRouteTables lists)
	// lags behind the route table: a listing shows the custom entries as they were Routes ago,
	// so a created entry is missing for that long, a status change shows that late and a
	// deleted entry is still listed, with its old status, for that long. CreateRouteEntry and
	// DeleteRouteEntry act on the true table (InvalidCIDRBlock.Duplicate for an entry the
	// listing does not show yet).
	Routes Duration `json:"routes,omitempty"`
}

// eniView is what a listing shows of an ENI's attachment at one moment.
type eniView struct {
	status      string
	instanceID  string
	deviceIndex int
	trunk       string // a member ENI's trunk ENI (deviceIndex is then its VLAN id)
	attachedAt  time.Time
	until       time.Time // for a past view: when it stopped being true
}

// lagState is the part of an ENI that only listings see.
type lagState struct {
	shownFrom map[netip.Addr]time.Time // assigned addresses the listing hides until then
	ghosts    map[netip.Addr]time.Time // unassigned addresses the listing shows until then
	past      []eniView                // earlier attachment states, oldest first
}

// SetListingLag changes the listing lag for later changes.
func (e *Emulator) SetListingLag(l ListingLag) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.lag = l
}

// noteAssignedLocked hides freshly assigned addresses from listings for the Assigned lag.
func (e *Emulator) noteAssignedLocked(n *eni, ips []netip.Addr) {
	now := e.now()
	for _, ip := range ips {
		delete(n.lag.ghosts, ip)
		if e.lag.Assigned > 0 {
			if n.lag.shownFrom == nil {
				n.lag.shownFrom = map[netip.Addr]time.Time{}
			}
			n.lag.shownFrom[ip] = now.Add(time.Duration(e.lag.Assigned))
		}
	}
}

// noteUnassignedLocked keeps an address that was listed in listings for the Unassigned lag.
func (e *Emulator) noteUnassignedLocked(n *eni, ip netip.Addr) {
	now := e.now()
	from, hidden := n.lag.shownFrom[ip]
	delete(n.lag.shownFrom, ip)
	if e.lag.Unassigned <= 0 || (hidden && now.Before(from)) {
		return // never listed yet: nothing to linger
	}
	if n.lag.ghosts == nil {
		n.lag.ghosts = map[netip.Addr]time.Time{}
	}
	n.lag.ghosts[ip] = now.Add(time.Duration(e.lag.Unassigned))
}

// noteSettlingLocked keeps an unassigned address busy for assigns by name for the Reassign lag.
func (e *Emulator) noteSettlingLocked(vs *vswitch, ip netip.Addr) {
	if e.lag.Reassign <= 0 {
		return
	}
	if vs.settling == nil {
		vs.settling = map[netip.Addr]time.Time{}
	}
	vs.settling[ip] = e.now().Add(time.Duration(e.lag.Reassign))
}

// transitionLocked runs change on n's attachment state and remembers the previous state for
// the Status lag.
func (e *Emulator) transitionLocked(n *eni, change func()) {
	prev := n.currentView()
	change()
	if e.lag.Status <= 0 {
		n.lag.past = nil
		return
	}
	now := e.now()
	prev.until = now
	// Forget states no listing can show any more.
	cut := now.Add(-time.Duration(e.lag.Status))
	n.lag.past = slices.DeleteFunc(n.lag.past, func(v eniView) bool { return !v.until.After(cut) })
	n.lag.past = append(n.lag.past, prev)
}

// viewLocked is the attachment state a listing shows now: the state that was true Status ago.
func (e *Emulator) viewLocked(n *eni) eniView {
	cut := e.now().Add(-time.Duration(e.lag.Status))
	for _, v := range n.lag.past {
		if v.until.After(cut) {
			return v
		}
	}
	return n.currentView()
}

// listedIPsLocked are the addresses a listing shows now, primary first: the true ones whose
// assignment is old enough, plus recently unassigned ones.
func (e *Emulator) listedIPsLocked(n *eni) []netip.Addr {
	now := e.now()
	out := make([]netip.Addr, 0, len(n.ips))
	for i, ip := range n.ips {
		if from, ok := n.lag.shownFrom[ip]; i > 0 && ok {
			if now.Before(from) {
				continue
			}
			delete(n.lag.shownFrom, ip)
		}
		out = append(out, ip)
	}
	var ghosts []netip.Addr
	for ip, until := range n.lag.ghosts {
		if !now.Before(until) {
			delete(n.lag.ghosts, ip)
			continue
		}
		if !slices.Contains(out, ip) {
			ghosts = append(ghosts, ip)
		}
	}
	slices.SortFunc(ghosts, func(a, b netip.Addr) int { return a.Compare(b) })
	return append(out, ghosts...)
}

// HeldCall is a call whose reply a HoldReply keeps back; its effect has taken place.
type HeldCall struct {
	Action string
	ENIID  string            // the ENI the call named, or created
	Tags   map[string]string // that ENI's tags
	// NextHopID is a route call's next hop (CreateRouteEntry: the instance).
	NextHopID string
}

type hold struct {
	action  string
	match   func(HeldCall) bool
	held    chan HeldCall
	release chan struct{}
	once    sync.Once
}

// HoldReply makes the next successful call of action that match accepts (nil: any) take
// effect and then not answer while its client is connected: held receives the call once its
// effect is in place, and the reply goes out only when release is called. A client killed
// meanwhile never learns the outcome: that is a lost reply. release also disarms a hold that
// has not fired; call it in every case. match runs under the emulator's lock and must not call
// the Emulator.
func (e *Emulator) HoldReply(action string, match func(HeldCall) bool) (held <-chan HeldCall, release func()) {
	h := &hold{action: action, match: match, held: make(chan HeldCall, 1), release: make(chan struct{})}
	e.mu.Lock()
	e.holds = append(e.holds, h)
	e.mu.Unlock()
	return h.held, func() {
		e.mu.Lock()
		e.holds = slices.DeleteFunc(e.holds, func(o *hold) bool { return o == h })
		e.mu.Unlock()
		h.once.Do(func() { close(h.release) })
	}
}

// takeHoldLocked returns (and disarms) the first hold that wants this successful call.
func (e *Emulator) takeHoldLocked(action string, p map[string]string, reply any) (*hold, HeldCall) {
	if len(e.holds) == 0 {
		return nil, HeldCall{}
	}
	c := HeldCall{Action: action, ENIID: p["NetworkInterfaceId"], Tags: map[string]string{}, NextHopID: p["NextHopId"]}
	if r, ok := reply.(wireENI); ok && c.ENIID == "" {
		c.ENIID = r.NetworkInterfaceID
	}
	if n, ok := e.enis[c.ENIID]; ok {
		for _, t := range n.tags {
			c.Tags[t.Key] = t.Value
		}
	}
	for i, h := range e.holds {
		if h.action == action && (h.match == nil || h.match(c)) {
			e.holds = append(e.holds[:i], e.holds[i+1:]...)
			return h, c
		}
	}
	return nil, HeldCall{}
}

// ListingLag is the listing lag in force.
func (e *Emulator) ListingLag() ListingLag {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.lag
}

// Longest is the longest of the lags a listing shows (Reassign is not a listing's).
func (l ListingLag) Longest() time.Duration {
	return time.Duration(max(l.Assigned, l.Unassigned, l.Status, l.Routes))
}
