package ecsemu

import (
	"encoding/json"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
)

const timeLayout = "2006-01-02T15:04:05Z"

// --- instances and instance types ---

func (e *Emulator) describeInstanceTypes(p map[string]string) (any, *APIError) {
	want := listParam(p, "InstanceTypes")
	var out []wireInstanceType
	for _, t := range e.cfg.InstanceTypes {
		if len(want) > 0 && !slices.Contains(want, t.ID) {
			continue
		}
		out = append(out, wireInstanceType{
			InstanceTypeID: t.ID, InstanceTypeFamily: family(t.ID), CpuCoreCount: t.CpuCoreCount,
			MemorySize: t.MemorySize, EniQuantity: t.EniQuantity,
			EniPrivateIPAddressQuantity: t.EniPrivateIpAddressQuantity, EniTotalQuantity: t.EniTotalQuantity,
			EniTrunkSupported: t.EniTrunkSupported, EniIpv6AddressQuantity: t.EniIpv6AddressQuantity,
		})
	}
	return map[string]any{"InstanceTypes": map[string]any{"InstanceType": nonNil(out)}, "NextToken": ""}, nil
}

// family is "ecs.g7" for "ecs.g7.large".
func family(id string) string {
	if i := strings.LastIndexByte(id, '.'); i > 0 {
		return id[:i]
	}
	return id
}

func (e *Emulator) describeInstances(p map[string]string) (any, *APIError) {
	var ids []string
	if s := p["InstanceIds"]; s != "" {
		if err := json.Unmarshal([]byte(s), &ids); err != nil {
			return nil, apiErr(http.StatusBadRequest, "InvalidInstanceIds.Malformed", "InstanceIds %q is not a JSON array of strings.", s)
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	var match []*instance
	for _, id := range e.instIDs {
		in := e.insts[id]
		if len(ids) > 0 && !slices.Contains(ids, id) {
			continue
		}
		if (p["VpcId"] != "" && p["VpcId"] != e.cfg.VPC.ID) ||
			(p["VSwitchId"] != "" && p["VSwitchId"] != in.cfg.VSwitchID) ||
			(p["ZoneId"] != "" && p["ZoneId"] != in.cfg.Zone) ||
			(p["InstanceType"] != "" && p["InstanceType"] != in.cfg.Type) {
			continue
		}
		match = append(match, in)
	}
	w, aerr := paginate(p, len(match), 10, 100)
	if aerr != nil {
		return nil, aerr
	}
	out := []wireInstance{}
	for _, in := range match[w.from:w.to] {
		out = append(out, e.wireInstanceLocked(in, true))
	}
	return map[string]any{
		"Instances": map[string]any{"Instance": out}, "TotalCount": len(match),
		"PageNumber": w.pageNumber, "PageSize": w.pageSize, "NextToken": w.nextToken,
	}, nil
}

func (e *Emulator) describeInstanceAttribute(p map[string]string) (any, *APIError) {
	if aerr := required(p, "InstanceId"); aerr != nil {
		return nil, aerr
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	in, ok := e.insts[p["InstanceId"]]
	if !ok {
		return nil, apiErr(http.StatusNotFound, CodeInstanceNotFound, "The specified InstanceId %q does not exist.", p["InstanceId"])
	}
	return e.wireInstanceLocked(in, false), nil
}

func (e *Emulator) wireInstanceLocked(in *instance, withENIs bool) wireInstance {
	w := wireInstance{
		InstanceID: in.cfg.ID, InstanceName: in.cfg.ID, HostName: in.cfg.ID, InstanceType: in.cfg.Type,
		InstanceTypeFamily: family(in.cfg.Type), InstanceNetworkType: "vpc", Status: "Running",
		RegionID: e.cfg.RegionID, ZoneID: in.cfg.Zone, Cpu: in.typ.CpuCoreCount,
		Memory: int(in.typ.MemorySize * 1024), CreationTime: in.created.UTC().Format(timeLayout),
		VpcAttributes: wireVpcAttributes{VpcID: e.cfg.VPC.ID, VSwitchID: in.cfg.VSwitchID,
			PrivateIPAddress: wireIPList{IPAddress: []string{in.cfg.PrimaryIP}}},
		SecurityGroupIDs: wireSGs{SecurityGroupID: nonNil(e.enis[in.primary].sgs)},
	}
	if withENIs {
		w.NetworkInterfaces = &struct {
			NetworkInterface []wireInstanceENI `json:"NetworkInterface"`
		}{NetworkInterface: []wireInstanceENI{}}
		for _, id := range e.eniIDs {
			n := e.enis[id]
			if v := e.viewLocked(n); v.instanceID != in.cfg.ID || v.status != StatusInUse || v.trunk != "" {
				continue
			}
			w.NetworkInterfaces.NetworkInterface = append(w.NetworkInterfaces.NetworkInterface, wireInstanceENI{
				NetworkInterfaceID: n.id, MacAddress: n.mac.String(), PrimaryIPAddress: n.ips[0].String(),
				Type: n.typ, VSwitchID: n.vswitch.cfg.ID, PrivateIPSets: ipSets(e.listedIPsLocked(n)),
			})
		}
	}
	return w
}

// --- vSwitches (VPC API) ---

func (e *Emulator) describeVSwitches(p map[string]string) (any, *APIError) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if p["VpcId"] != "" && p["VpcId"] != e.cfg.VPC.ID {
		return map[string]any{"VSwitches": map[string]any{"VSwitch": []wireVSwitch{}}, "TotalCount": 0, "PageNumber": 1, "PageSize": 10}, nil
	}
	var match []*vswitch
	for _, id := range e.vswOrder {
		v := e.vsws[id]
		if (p["VSwitchId"] != "" && p["VSwitchId"] != id) || (p["ZoneId"] != "" && p["ZoneId"] != v.cfg.Zone) {
			continue
		}
		match = append(match, v)
	}
	w, aerr := paginate(p, len(match), 10, 50)
	if aerr != nil {
		return nil, aerr
	}
	out := []wireVSwitch{}
	for _, v := range match[w.from:w.to] {
		out = append(out, wireVSwitch{
			VSwitchID: v.cfg.ID, VpcID: e.cfg.VPC.ID, ZoneID: v.cfg.Zone, CidrBlock: v.prefix.String(),
			Status: "Available", AvailableIPAddressCount: int64(usableCount(v.prefix) - len(v.used)),
			VSwitchName: v.cfg.ID, CreationTime: "2026-01-01T00:00:00Z",
		})
	}
	return map[string]any{"VSwitches": map[string]any{"VSwitch": out}, "TotalCount": len(match),
		"PageNumber": w.pageNumber, "PageSize": w.pageSize}, nil
}

// --- network interfaces ---

func ipSets(ips []netip.Addr) wirePrivateIPSets {
	s := wirePrivateIPSets{PrivateIPSet: []wirePrivateIP{}}
	for i, ip := range ips {
		s.PrivateIPSet = append(s.PrivateIPSet, wirePrivateIP{PrivateIPAddress: ip.String(), Primary: i == 0})
	}
	return s
}

// listedENILocked is an ENI as a listing shows it now, lag included (see ListingLag).
func (e *Emulator) listedENILocked(n *eni) wireENI {
	return e.wireENILocked(n, e.viewLocked(n), e.listedIPsLocked(n))
}

// trueENILocked is an ENI as it is, for the reply of the call that changed it.
func (e *Emulator) trueENILocked(n *eni) wireENI {
	return e.wireENILocked(n, n.currentView(), n.ips)
}

func (e *Emulator) wireENILocked(n *eni, v eniView, ips []netip.Addr) wireENI {
	w := wireENI{
		NetworkInterfaceID: n.id, NetworkInterfaceName: n.name, Description: n.description,
		Status: v.status, Type: n.typeIn(v), VpcID: e.cfg.VPC.ID, VSwitchID: n.vswitch.cfg.ID,
		ZoneID: n.vswitch.cfg.Zone, MacAddress: n.mac.String(), PrivateIPAddress: n.ips[0].String(),
		InstanceID: v.instanceID, CreationTime: n.created.UTC().Format(timeLayout),
		SecurityGroupIDs: wireSGs{SecurityGroupID: nonNil(n.sgs)}, PrivateIPSets: ipSets(ips),
		Tags: wireTags{Tag: []wireTag{}}, OwnerID: "1234567890123456", SourceDestCheck: false,
	}
	for _, t := range n.tags {
		w.Tags.Tag = append(w.Tags.Tag, wireTag{Key: t.Key, Value: t.Value, TagKey: t.Key, TagValue: t.Value})
	}
	if v.instanceID != "" {
		w.Attachment = &wireAttachment{InstanceID: v.instanceID, DeviceIndex: v.deviceIndex}
		e.trunkAttachmentLocked(n, v, &w)
		if !v.attachedAt.IsZero() {
			w.Attachment.AttachedTime = v.attachedAt.UTC().Format(timeLayout)
		}
	}
	return w
}

func (e *Emulator) describeNetworkInterfaces(p map[string]string) (any, *APIError) {
	ids := listParam(p, "NetworkInterfaceId")
	ipFilter := listParam(p, "PrivateIpAddress")
	tags := tagParams(p)
	e.mu.Lock()
	defer e.mu.Unlock()
	var match []*eni
	for _, id := range e.eniIDs {
		n := e.enis[id]
		if len(ids) > 0 && !slices.Contains(ids, id) {
			continue
		}
		v := e.viewLocked(n) // filters see what the listing shows
		if (p["InstanceId"] != "" && p["InstanceId"] != v.instanceID) ||
			(p["VSwitchId"] != "" && p["VSwitchId"] != n.vswitch.cfg.ID) ||
			(p["VpcId"] != "" && p["VpcId"] != e.cfg.VPC.ID) ||
			(p["Status"] != "" && p["Status"] != v.status) ||
			(p["Type"] != "" && p["Type"] != n.typeIn(v)) ||
			(p["SecurityGroupId"] != "" && !slices.Contains(n.sgs, p["SecurityGroupId"])) ||
			(p["NetworkInterfaceName"] != "" && p["NetworkInterfaceName"] != n.name) ||
			(p["PrimaryIpAddress"] != "" && p["PrimaryIpAddress"] != n.ips[0].String()) {
			continue
		}
		if len(ipFilter) > 0 && !slices.ContainsFunc(e.listedIPsLocked(n), func(a netip.Addr) bool { return slices.Contains(ipFilter, a.String()) }) {
			continue
		}
		if !hasTags(n.tags, tags) {
			continue
		}
		match = append(match, n)
	}
	w, aerr := paginate(p, len(match), 10, 1000)
	if aerr != nil {
		return nil, aerr
	}
	r := describeENIsReply{NetworkInterfaceSets: wireENIs{NetworkInterfaceSet: []wireENI{}}, TotalCount: len(match),
		PageNumber: w.pageNumber, PageSize: w.pageSize, NextToken: w.nextToken}
	for _, n := range match[w.from:w.to] {
		r.NetworkInterfaceSets.NetworkInterfaceSet = append(r.NetworkInterfaceSets.NetworkInterfaceSet, e.listedENILocked(n))
	}
	return r, nil
}

// hasTags reports whether have contains every wanted tag (an empty wanted Value matches any).
func hasTags(have, want []tag) bool {
	for _, w := range want {
		if !slices.ContainsFunc(have, func(h tag) bool { return h.Key == w.Key && (w.Value == "" || h.Value == w.Value) }) {
			return false
		}
	}
	return true
}

func (e *Emulator) enILocked(id string) (*eni, *APIError) {
	n, ok := e.enis[id]
	if !ok {
		return nil, apiErr(http.StatusNotFound, CodeEniNotFound, "The specified NetworkInterfaceId %q does not exist.", id)
	}
	return n, nil
}

// allocLocked takes n free addresses from vs, lowest first (deterministic for tests). A
// vSwitch without enough free addresses answers exhausted.
// An address still settling after an unassign (ListingLag.Reassign) is skipped, as the VPC
// does not hand out an address it is still releasing.
func allocLocked(vs *vswitch, n int, now time.Time, exhausted func(format string, args ...any) *APIError) ([]netip.Addr, *APIError) {
	if usableCount(vs.prefix)-len(vs.used) < n {
		return nil, exhausted("The specified VSwitch %s does not have enough IP addresses: %d requested, %d available.", vs.cfg.ID, n, usableCount(vs.prefix)-len(vs.used))
	}
	var out []netip.Addr
	for a := vs.prefix.Addr().Next(); len(out) < n && vs.prefix.Contains(a); a = a.Next() {
		if until, settling := vs.settling[a]; settling && now.Before(until) {
			continue
		}
		if _, used := vs.used[a]; !used && usable(vs.prefix, a) {
			out = append(out, a)
		}
	}
	if len(out) < n {
		return nil, exhausted("The specified VSwitch %s does not have enough IP addresses: %d requested, %d available (others are still being released).", vs.cfg.ID, n, len(out))
	}
	return out, nil
}

// checkRequestedIPsLocked validates explicitly requested addresses against vs.
// Codes as the published ECS error tables give them: Malformed for what is not an address,
// InvalidPrivateIpAddress for one outside the vSwitch's CIDR block (or one of its reserved
// addresses), Duplicated for one in use — or, with ListingLag.Reassign, still being released.
func checkRequestedIPsLocked(vs *vswitch, ips []string, now time.Time) ([]netip.Addr, *APIError) {
	var out []netip.Addr
	for _, s := range ips {
		a, err := netip.ParseAddr(s)
		if err != nil || !a.Is4() {
			return nil, apiErr(http.StatusBadRequest, CodeIPMalformed, "The specified private IP address %q is malformed.", s)
		}
		if !usable(vs.prefix, a) {
			return nil, apiErr(http.StatusBadRequest, CodeIPNotInVSwitch, "The specified private IP address %s is not a usable address of the CIDR block of vSwitch %s (%s).", s, vs.cfg.ID, vs.prefix)
		}
		if _, used := vs.used[a]; used || slices.Contains(out, a) {
			return nil, apiErr(http.StatusBadRequest, CodeIPAddressAlreadyUsed, "The specified private IP address %s is already in use.", a)
		}
		if until, ok := vs.settling[a]; ok {
			if now.Before(until) {
				return nil, apiErr(http.StatusBadRequest, CodeIPAddressAlreadyUsed, "The specified private IP address %s is already in use.", a)
			}
			delete(vs.settling, a)
		}
		out = append(out, a)
	}
	return out, nil
}

func (e *Emulator) createNetworkInterface(p map[string]string) (any, *APIError) {
	if aerr := required(p, "VSwitchId"); aerr != nil {
		return nil, aerr
	}
	sgs := listParam(p, "SecurityGroupIds")
	if p["SecurityGroupId"] != "" {
		sgs = append([]string{p["SecurityGroupId"]}, sgs...)
	}
	if len(sgs) == 0 {
		return nil, apiErr(http.StatusBadRequest, CodeMissingParameter, "The input parameter \"SecurityGroupId\" (or SecurityGroupIds.N) that is mandatory for processing this request is not supplied.")
	}
	secondary, aerr := intParam(p, "SecondaryPrivateIpAddressCount", 0, 0, availableENIIPLimit-1)
	if aerr != nil {
		return nil, aerr
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	tokenKey := ""
	if t := p["ClientToken"]; t != "" {
		tokenKey = "CreateNetworkInterface/" + t
		if prev, ok := e.tokens[tokenKey]; ok {
			// The same call again: the first reply, with exactly the addresses it created
			// (whatever was assigned or unassigned since).
			r := prev.(wireENI)
			if _, ok := e.enis[r.NetworkInterfaceID]; ok {
				return r, nil
			}
			return nil, apiErr(http.StatusBadRequest, CodeIdempotentMismatch, "ClientToken %q was used for ENI %s, which no longer exists.", t, r.NetworkInterfaceID)
		}
	}
	vs, ok := e.vsws[p["VSwitchId"]]
	if !ok {
		return nil, apiErr(http.StatusNotFound, CodeVSwitchNotFound, "The specified VSwitchId %q does not exist.", p["VSwitchId"])
	}
	for _, sg := range sgs {
		if !e.sgs[sg] {
			return nil, apiErr(http.StatusNotFound, CodeSecurityGroupNotFound, "The specified SecurityGroupId %q does not exist.", sg)
		}
	}
	var want []string
	if s := p["PrimaryIpAddress"]; s != "" {
		want = append(want, s)
	}
	explicit := listParam(p, "PrivateIpAddress")
	if len(explicit) > 0 && secondary > 0 {
		return nil, apiErr(http.StatusBadRequest, CodeInvalidParameter, "PrivateIpAddress.N and SecondaryPrivateIpAddressCount cannot both be set.")
	}
	want = append(want, explicit...)
	ips, aerr := checkRequestedIPsLocked(vs, want, e.now())
	if aerr != nil {
		return nil, aerr
	}
	need := secondary
	if p["PrimaryIpAddress"] == "" {
		need++ // the primary comes from the pool too
	}
	if len(ips)+need > availableENIIPLimit {
		return nil, apiErr(http.StatusForbidden, CodeIpv4CountExceeded, "An ENI that is not attached holds at most %d private IP addresses; %d were requested.", availableENIIPLimit, len(ips)+need)
	}
	more, aerr := allocLocked(vs, need, e.now(), func(f string, a ...any) *APIError {
		return apiErr(http.StatusForbidden, CodeVSwitchIPNotEnough, f, a...)
	})
	if aerr != nil {
		return nil, aerr
	}
	if p["PrimaryIpAddress"] == "" {
		ips = append(more[:1:1], append(ips, more[1:]...)...)
	} else {
		ips = append(ips, more...)
	}
	typ, aerr := createType(p["InstanceType"])
	if aerr != nil {
		return nil, aerr
	}
	n := e.newENILocked(vs, typ, ips, sgs)
	n.tags = tagParams(p)
	n.name = p["NetworkInterfaceName"]
	n.description = p["Description"]
	e.noteAssignedLocked(n, n.ips[1:])
	reply := e.trueENILocked(n)
	if tokenKey != "" {
		e.tokens[tokenKey] = reply
	}
	e.log.Info("ENI created", zap.String("eni", n.id), zap.String("mac", n.mac.String()), zap.String("vSwitch", vs.cfg.ID))
	return reply, nil
}

func (e *Emulator) attachNetworkInterface(p map[string]string) (any, *APIError) {
	if aerr := required(p, "InstanceId", "NetworkInterfaceId"); aerr != nil {
		return nil, aerr
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	in, ok := e.insts[p["InstanceId"]]
	if !ok {
		return nil, apiErr(http.StatusNotFound, CodeInstanceNotFound, "The specified InstanceId %q does not exist.", p["InstanceId"])
	}
	n, aerr := e.enILocked(p["NetworkInterfaceId"])
	if aerr != nil {
		return nil, aerr
	}
	if n.typ == TypePrimary {
		return nil, apiErr(http.StatusForbidden, CodeInvalidEniType, "ENI %s is a primary ENI and cannot be attached.", n.id)
	}
	if p["TrunkNetworkInstanceId"] != "" {
		return e.attachMemberLocked(in, n, p["TrunkNetworkInstanceId"])
	}
	if n.status != StatusAvailable {
		return nil, apiErr(http.StatusForbidden, CodeInvalidEniState, "ENI %s is %s; it must be Available to attach.", n.id, n.status)
	}
	if aerr := e.checkTrunkAttachLocked(in, n); aerr != nil {
		return nil, aerr
	}
	if n.vswitch.cfg.Zone != in.cfg.Zone {
		return nil, apiErr(http.StatusForbidden, CodeEniZoneMismatch, "ENI %s is in zone %s but instance %s is in %s.", n.id, n.vswitch.cfg.Zone, in.cfg.ID, in.cfg.Zone)
	}
	used := map[int]bool{}
	count := 0
	for _, id := range e.eniIDs {
		o := e.enis[id]
		if o.instanceID == in.cfg.ID && o.trunk == "" && (o.status == StatusAttaching || o.status == StatusInUse || o.status == StatusDetaching) {
			used[o.deviceIndex] = true
			if o.status != StatusDetaching {
				count++
			}
		}
	}
	if count >= in.typ.EniQuantity {
		return nil, apiErr(http.StatusForbidden, CodeEniPerInstanceLimit,
			"Instance %s (%s) already has %d ENIs, its limit (primary ENI included).", in.cfg.ID, in.cfg.Type, count)
	}
	if len(n.ips) > in.typ.EniPrivateIpAddressQuantity {
		return nil, apiErr(http.StatusForbidden, CodeIpv4CountExceeded,
			"ENI %s has %d private IP addresses; instance type %s allows %d per ENI.", n.id, len(n.ips), in.cfg.Type, in.typ.EniPrivateIpAddressQuantity)
	}
	idx := 1
	for used[idx] {
		idx++
	}
	e.transitionLocked(n, func() {
		n.status = StatusAttaching
		n.instanceID = in.cfg.ID
		n.deviceIndex = idx
	})
	n.gen++
	e.scheduleLocked(n, time.Duration(e.delays.Attach), e.finishAttachLocked)
	return map[string]any{}, nil
}

func (e *Emulator) finishAttachLocked(n *eni) {
	if err := e.sdn.AttachENI(e.infoLocked(n)); err != nil {
		e.log.Error("SDN attach failed; ENI goes back to Available", zap.String("eni", n.id),
			zap.String("instance", n.instanceID), zap.Error(err))
		e.transitionLocked(n, func() {
			n.status = StatusAvailable
			n.instanceID = ""
			n.deviceIndex = 0
		})
		return
	}
	n.plugged = true
	e.transitionLocked(n, func() {
		n.status = StatusInUse
		n.attachedAt = e.now()
	})
	e.log.Info("ENI attached", zap.String("eni", n.id), zap.String("instance", n.instanceID), zap.Int("deviceIndex", n.deviceIndex))
}

func (e *Emulator) detachNetworkInterface(p map[string]string) (any, *APIError) {
	if aerr := required(p, "InstanceId", "NetworkInterfaceId"); aerr != nil {
		return nil, aerr
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, ok := e.insts[p["InstanceId"]]; !ok {
		return nil, apiErr(http.StatusNotFound, CodeInstanceNotFound, "The specified InstanceId %q does not exist.", p["InstanceId"])
	}
	n, aerr := e.enILocked(p["NetworkInterfaceId"])
	if aerr != nil {
		return nil, aerr
	}
	if n.typ == TypePrimary {
		return nil, apiErr(http.StatusForbidden, CodeInvalidOperationPrimary, "ENI %s is the primary ENI of %s and cannot be detached.", n.id, n.instanceID)
	}
	if n.status != StatusInUse || n.instanceID != p["InstanceId"] {
		return nil, apiErr(http.StatusForbidden, CodeInvalidEniState, "ENI %s is %s (instance %q); it must be InUse on instance %s to detach.", n.id, n.status, n.instanceID, p["InstanceId"])
	}
	if aerr := e.checkTrunkDetachLocked(n, p["TrunkNetworkInstanceId"]); aerr != nil {
		return nil, aerr
	}
	e.transitionLocked(n, func() { n.status = StatusDetaching })
	n.gen++
	e.scheduleLocked(n, e.detachDelayLocked(n), e.finishDetachLocked)
	return map[string]any{}, nil
}

func (e *Emulator) finishDetachLocked(n *eni) {
	if n.plugged {
		if err := e.sdn.DetachENI(e.infoLocked(n)); err != nil {
			// The cloud side has let go; report the leftover link rather than wedging the ENI.
			e.log.Error("SDN detach failed", zap.String("eni", n.id), zap.Error(err))
		}
		n.plugged = false
	}
	e.log.Info("ENI detached", zap.String("eni", n.id), zap.String("instance", n.instanceID))
	e.transitionLocked(n, func() {
		n.status = StatusAvailable
		n.instanceID = ""
		n.deviceIndex = 0
		n.trunk = ""
		n.attachedAt = time.Time{}
	})
}

func (e *Emulator) deleteNetworkInterface(p map[string]string) (any, *APIError) {
	if aerr := required(p, "NetworkInterfaceId"); aerr != nil {
		return nil, aerr
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	n, aerr := e.enILocked(p["NetworkInterfaceId"])
	if aerr != nil {
		return nil, aerr
	}
	if n.typ == TypePrimary || n.status != StatusAvailable {
		return nil, apiErr(http.StatusForbidden, CodeInvalidEniState, "ENI %s is %s %s; only an Available secondary ENI can be deleted.", n.id, n.typ, n.status)
	}
	e.transitionLocked(n, func() { n.status = StatusDeleting })
	n.gen++
	e.scheduleLocked(n, time.Duration(e.delays.Delete), e.finishDeleteLocked)
	return map[string]any{}, nil
}

func (e *Emulator) finishDeleteLocked(n *eni) {
	for _, ip := range n.ips {
		delete(n.vswitch.used, ip)
	}
	delete(e.enis, n.id)
	e.eniIDs = slices.DeleteFunc(e.eniIDs, func(id string) bool { return id == n.id })
	e.log.Info("ENI deleted", zap.String("eni", n.id))
}

// scheduleLocked runs finish after d, or now when d is 0, under the state lock. A transition
// started later (gen changed) or Close cancels it.
func (e *Emulator) scheduleLocked(n *eni, d time.Duration, finish func(*eni)) {
	if n.timer != nil {
		n.timer.Stop()
		n.timer, n.pending = nil, nil
	}
	if d <= 0 {
		finish(n)
		return
	}
	gen := n.gen
	n.pending = finish
	n.timer = time.AfterFunc(d, func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		if e.closed || n.gen != gen || n.pending == nil {
			return
		}
		n.timer, n.pending = nil, nil
		finish(n)
	})
}

// FinishTransitions completes every pending ENI and route state transition now, as if its delay had
// passed. Tests use it to step past Attaching/Detaching/Deleting without sleeping.
func (e *Emulator) FinishTransitions() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, id := range slices.Clone(e.eniIDs) {
		n := e.enis[id]
		if n == nil || n.pending == nil {
			continue
		}
		n.timer.Stop()
		finish := n.pending
		n.timer, n.pending = nil, nil
		finish(n)
	}
	for _, r := range slices.Clone(e.rt.entries) {
		if r.timer == nil {
			continue
		}
		r.timer.Stop()
		r.timer = nil
		r.gen++
		if r.status == RouteStatusPending {
			e.finishRouteCreateLocked(r)
		} else {
			e.finishRouteDeleteLocked(r)
		}
	}
}

// ipLimitLocked is how many addresses n may hold: the instance type's per-ENI limit once
// attached, the API's fixed limit while Available. Past either, the API answers
// InvalidOperation.Ipv4CountExceeded (QuotaExceeded.PrivateIpAddress is the vSwitch's).
func (e *Emulator) ipLimitLocked(n *eni) int {
	if n.instanceID != "" {
		return e.insts[n.instanceID].typ.EniPrivateIpAddressQuantity
	}
	return availableENIIPLimit
}

func (e *Emulator) assignPrivateIPAddresses(p map[string]string) (any, *APIError) {
	if aerr := required(p, "NetworkInterfaceId"); aerr != nil {
		return nil, aerr
	}
	count, aerr := intParam(p, "SecondaryPrivateIpAddressCount", 0, 1, availableENIIPLimit)
	if aerr != nil {
		return nil, aerr
	}
	explicit := listParam(p, "PrivateIpAddress")
	if (count == 0) == (len(explicit) == 0) {
		return nil, apiErr(http.StatusBadRequest, CodeInvalidParameter, "Set exactly one of SecondaryPrivateIpAddressCount and PrivateIpAddress.N.")
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	tokenKey := ""
	if t := p["ClientToken"]; t != "" {
		tokenKey = "AssignPrivateIpAddresses/" + t
		if prev, ok := e.tokens[tokenKey]; ok {
			r := prev.(assignReply)
			if r.AssignedPrivateIPAddressesSet.NetworkInterfaceID != p["NetworkInterfaceId"] {
				return nil, apiErr(http.StatusBadRequest, "IdempotentParameterMismatch", "ClientToken %q was used for another ENI.", t)
			}
			return r, nil
		}
	}
	n, aerr := e.enILocked(p["NetworkInterfaceId"])
	if aerr != nil {
		return nil, aerr
	}
	if n.status != StatusAvailable && n.status != StatusInUse {
		return nil, apiErr(http.StatusForbidden, CodeInvalidEniState, "ENI %s is %s; addresses can be assigned only when it is Available or InUse.", n.id, n.status)
	}
	var ips []netip.Addr
	if len(explicit) > 0 {
		ips, aerr = checkRequestedIPsLocked(n.vswitch, explicit, e.now())
		count = len(ips)
	}
	if aerr != nil {
		return nil, aerr
	}
	if limit := e.ipLimitLocked(n); len(n.ips)+count > limit {
		return nil, apiErr(http.StatusForbidden, CodeIpv4CountExceeded, "ENI %s holds %d private IP addresses and %d more would exceed its limit of %d.", n.id, len(n.ips), count, limit)
	}
	if ips == nil {
		// The published error table: QuotaExceeded.PrivateIpAddress (HTTP 400) is an assign
		// the vSwitch has too few free addresses for.
		exhausted := func(f string, a ...any) *APIError { return apiErr(http.StatusBadRequest, CodeQuotaPrivateIP, f, a...) }
		if ips, aerr = allocLocked(n.vswitch, count, e.now(), exhausted); aerr != nil {
			return nil, aerr
		}
	}
	for i, ip := range ips {
		if n.plugged {
			if err := e.sdn.AssignIP(e.infoLocked(n), ip); err != nil {
				for _, undo := range ips[:i] {
					_ = e.sdn.UnassignIP(e.infoLocked(n), undo)
				}
				return nil, apiErr(http.StatusInternalServerError, CodeInternalError, "route %s to ENI %s: %v", ip, n.id, err)
			}
		}
	}
	var r assignReply
	r.AssignedPrivateIPAddressesSet.NetworkInterfaceID = n.id
	for _, ip := range ips {
		n.vswitch.used[ip] = n.id
		n.ips = append(n.ips, ip)
		r.AssignedPrivateIPAddressesSet.PrivateIPSet.PrivateIPAddress = append(r.AssignedPrivateIPAddressesSet.PrivateIPSet.PrivateIPAddress, ip.String())
	}
	e.noteAssignedLocked(n, ips)
	if tokenKey != "" {
		e.tokens[tokenKey] = r
	}
	e.log.Info("private IPs assigned", zap.String("eni", n.id), zap.Stringers("ips", ips))
	return r, nil
}

func (e *Emulator) unassignPrivateIPAddresses(p map[string]string) (any, *APIError) {
	if aerr := required(p, "NetworkInterfaceId"); aerr != nil {
		return nil, aerr
	}
	want := listParam(p, "PrivateIpAddress")
	if len(want) == 0 {
		return nil, apiErr(http.StatusBadRequest, CodeMissingParameter, "The input parameter \"PrivateIpAddress.N\" that is mandatory for processing this request is not supplied.")
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	n, aerr := e.enILocked(p["NetworkInterfaceId"])
	if aerr != nil {
		return nil, aerr
	}
	if n.status != StatusAvailable && n.status != StatusInUse {
		return nil, apiErr(http.StatusForbidden, CodeInvalidEniState, "ENI %s is %s; addresses can be unassigned only when it is Available or InUse.", n.id, n.status)
	}
	var drop []netip.Addr
	for _, s := range want {
		a, err := netip.ParseAddr(s)
		i := slices.Index(n.ips, a)
		if err != nil || i < 0 {
			return nil, apiErr(http.StatusForbidden, CodeIPUnassigned, "The private IP address %q is not assigned to ENI %s.", s, n.id)
		}
		if i == 0 {
			return nil, apiErr(http.StatusBadRequest, CodeInvalidParameter, "%s is the primary private IP address of ENI %s and cannot be unassigned.", s, n.id)
		}
		drop = append(drop, a)
	}
	for _, ip := range drop {
		if n.plugged {
			if err := e.sdn.UnassignIP(e.infoLocked(n), ip); err != nil {
				e.log.Error("SDN unassign failed", zap.String("eni", n.id), zap.Stringer("ip", ip), zap.Error(err))
			}
		}
		delete(n.vswitch.used, ip)
		n.ips = slices.DeleteFunc(n.ips, func(a netip.Addr) bool { return a == ip })
		e.noteUnassignedLocked(n, ip)
		e.noteSettlingLocked(n.vswitch, ip)
	}
	e.log.Info("private IPs unassigned", zap.String("eni", n.id), zap.Stringers("ips", drop))
	return map[string]any{}, nil
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}
