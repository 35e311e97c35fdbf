// Package trunk gives pods member ENIs on the node's trunk ENI (ENI trunking, eni_conf
// enable_eni_trunking): one trunk ENI per node, attached like any ENI, and per pod a member
// ENI of its own (its own address, and its own security groups where the pod asks) that the
// cloud puts on a VLAN of the trunk. The datapath (datapath.Trunk) tags the pod's traffic
// with that VLAN on the trunk's link.
//
// State lives in the cloud, not on the node: every ENI this package creates carries tags that
// name the cluster, the node and (for a member) the pod, and a member is created with a
// ClientToken derived from the pod, so an agent killed at any point finds its work again —
// a retried Allocate returns the same ENI, and GC removes the members of pods that are gone.
// The tags differ from the ENIIP pool's (tern.io/trunk-node, not tern.io/node), so the pool
// never adopts, reclaims or counts these ENIs.
package trunk

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"sync"

	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam/aliyun"
)

// Tags of the ENIs this package creates.
const (
	TagCreator   = "creator"
	CreatorTern  = "tern"
	TagCluster   = "tern.io/cluster"
	TagTrunkNode = "tern.io/trunk-node"
	TagRole      = "tern.io/trunk-role" // RoleTrunk or RoleMember
	TagPod       = "tern.io/pod"        // a member's pod key
	RoleTrunk    = "trunk"
	RoleMember   = "member"
)

// ResourceMemberENI is the Node's extended resource of member ENIs (Terway's name); a trunk
// pod requests one.
const ResourceMemberENI = "aliyun/member-eni"

// ErrNotSupported means the instance type cannot take member ENIs.
var ErrNotSupported = errors.New("instance type does not support ENI trunking")

// Options configure a Manager.
type Options struct {
	InstanceID     string
	NodeName       string
	ClusterID      string
	VSwitchID      string   // where the trunk and the members take their addresses
	SecurityGroups []string // the default for members; a pod may ask for its own
	Tags           map[string]string
}

// Member is a pod's member ENI as the datapath needs it.
type Member struct {
	ENIID    string
	MAC      string
	IP       netip.Addr
	VLAN     int
	TrunkID  string
	PodKey   string
	VSwitch  string
	TrunkMAC string
}

// Manager owns the node's trunk ENI and its members. Its methods are safe for concurrent use.
type Manager struct {
	cloud aliyun.TrunkCloud
	opts  Options
	log   *zap.Logger

	mu    sync.Mutex
	trunk aliyun.ENI
	quota int
}

// New makes a Manager; nothing is called until Start.
func New(cloud aliyun.TrunkCloud, opts Options, log *zap.Logger) *Manager {
	if log == nil {
		log = zap.NewNop()
	}
	return &Manager{cloud: cloud, opts: opts, log: log.Named("trunk")}
}

func (m *Manager) baseTags(role string) map[string]string {
	t := map[string]string{}
	for k, v := range m.opts.Tags {
		t[k] = v
	}
	t[TagCreator], t[TagCluster], t[TagTrunkNode], t[TagRole] = CreatorTern, m.opts.ClusterID, m.opts.NodeName, role
	return t
}

// token is a ClientToken (at most 64 characters) for one logical create.
func (m *Manager) token(kind, key string) string {
	h := sha256.Sum256([]byte(m.opts.ClusterID + "\x00" + m.opts.NodeName + "\x00" + m.opts.InstanceID + "\x00" + kind + "\x00" + key))
	return "tern-" + kind[:1] + "-" + hex.EncodeToString(h[:20])
}

// Start learns the member quota and makes sure the node's trunk ENI exists and is attached:
// it adopts one it created before (by tags), or creates one.
func (m *Manager) Start(ctx context.Context) error {
	inst, err := m.cloud.Instance(ctx, m.opts.InstanceID)
	if err != nil {
		return fmt.Errorf("trunking: describe instance %s: %w", m.opts.InstanceID, err)
	}
	lim, err := m.cloud.InstanceTypeLimits(ctx, inst.Type)
	if err != nil {
		return fmt.Errorf("trunking: limits of instance type %s: %w", inst.Type, err)
	}
	quota := aliyun.MemberQuota(lim)
	if quota == 0 {
		return fmt.Errorf("trunking: %s (EniTrunkSupported %t, EniTotalQuantity %d, EniQuantity %d): %w; set enable_eni_trunking false on this node",
			inst.Type, lim.TrunkSupport, lim.TotalENIs, lim.ENIs, ErrNotSupported)
	}
	trunk, err := m.ensureTrunk(ctx)
	if err != nil {
		return err
	}
	m.mu.Lock()
	m.trunk, m.quota = trunk, quota
	m.mu.Unlock()
	m.log.Info("trunk ENI ready", zap.String("eni", trunk.ID), zap.String("mac", trunk.MAC), zap.Int("memberQuota", quota))
	return nil
}

func (m *Manager) ensureTrunk(ctx context.Context) (aliyun.ENI, error) {
	ours, err := m.cloud.ListENIs(ctx, aliyun.ENIFilter{Tags: m.baseTags(RoleTrunk)})
	if err != nil {
		return aliyun.ENI{}, fmt.Errorf("trunking: list this node's trunk ENI: %w", err)
	}
	sort.Slice(ours, func(i, j int) bool { return ours[i].ID < ours[j].ID })
	for _, e := range ours {
		if e.Status == aliyun.StatusInUse && e.InstanceID == m.opts.InstanceID {
			return e, nil
		}
	}
	var trunk aliyun.ENI
	if len(ours) > 0 && ours[0].Status == aliyun.StatusAvailable {
		trunk = ours[0]
	} else {
		trunk, err = m.cloud.CreateENI(ctx, aliyun.CreateENIRequest{VSwitchID: m.opts.VSwitchID, SecurityGroups: m.opts.SecurityGroups,
			Tags: m.baseTags(RoleTrunk), Description: "tern trunk ENI of node " + m.opts.NodeName,
			Token: m.token("trunk", m.opts.InstanceID), Trunk: true})
		if err != nil {
			return aliyun.ENI{}, fmt.Errorf("trunking: create the trunk ENI on vSwitch %s: %w", m.opts.VSwitchID, err)
		}
	}
	att, err := m.cloud.AttachENI(ctx, trunk.ID, m.opts.InstanceID)
	if err != nil {
		return aliyun.ENI{}, fmt.Errorf("trunking: attach trunk ENI %s to %s: %w", trunk.ID, m.opts.InstanceID, err)
	}
	return att, nil
}

// Trunk returns the trunk ENI (zero before Start).
func (m *Manager) Trunk() aliyun.ENI {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.trunk
}

// Quota is how many member ENIs the node takes: the capacity of ResourceMemberENI.
func (m *Manager) Quota() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.quota
}

// MemberRequest places one pod's member ENI; the zero value takes the Manager's defaults.
type MemberRequest struct {
	// VSwitchID, when set, is the member's vSwitch instead of Options.VSwitchID (a pod's
	// k8s.aliyun.com/pod-networks; the caller checks it is in the node's zone). The member's
	// traffic still crosses the trunk's link: the VPC routes a member's address to its trunk
	// whatever its vSwitch.
	VSwitchID string
	// SecurityGroups, when set, replace Options.SecurityGroups for this pod.
	SecurityGroups []string
}

// Allocate gives the pod podKey a member ENI on the trunk. Calling it again for the same pod
// (a CNI retry, or after the agent was killed) returns the same ENI: the caller must ask with
// the same placement, since the ClientToken is the pod's.
func (m *Manager) Allocate(ctx context.Context, podKey string, req MemberRequest) (Member, error) {
	trunk := m.Trunk()
	if trunk.ID == "" {
		return Member{}, fmt.Errorf("trunk member for %s: the trunk ENI is not ready (Start failed or has not run)", podKey)
	}
	sgs := m.opts.SecurityGroups
	if len(req.SecurityGroups) > 0 {
		sgs = req.SecurityGroups
	}
	vsw := m.opts.VSwitchID
	if req.VSwitchID != "" {
		vsw = req.VSwitchID
	}
	tags := m.baseTags(RoleMember)
	tags[TagPod] = podKey
	e, err := m.cloud.CreateENI(ctx, aliyun.CreateENIRequest{VSwitchID: vsw, SecurityGroups: sgs, Tags: tags,
		Description: "tern member ENI of pod " + podKey, Token: m.token("member", podKey)})
	if err != nil {
		return Member{}, fmt.Errorf("trunk member for %s: create ENI: %w", podKey, err)
	}
	att, err := m.cloud.AttachMemberENI(ctx, e.ID, m.opts.InstanceID, trunk.ID)
	if err != nil {
		// Roll back only what cannot be a success: with the context gone the attach may
		// still complete, and GC or the retry settles it.
		if ctx.Err() == nil && !errors.Is(err, aliyun.ErrTimeout) {
			if derr := m.cloud.DeleteENI(context.WithoutCancel(ctx), e.ID); derr != nil {
				m.log.Warn("could not delete a member ENI whose attach failed; GC will", zap.String("eni", e.ID), zap.NamedError("attachError", err), zap.Error(derr))
			}
		}
		return Member{}, fmt.Errorf("trunk member for %s: attach ENI %s to trunk %s: %w", podKey, e.ID, trunk.ID, err)
	}
	return Member{ENIID: att.ID, MAC: att.MAC, IP: e.PrimaryIP, VLAN: att.VLAN, TrunkID: trunk.ID,
		PodKey: podKey, VSwitch: e.VSwitchID, TrunkMAC: trunk.MAC}, nil
}

// members lists this node's member ENIs, with the pod each belongs to.
func (m *Manager) members(ctx context.Context) ([]aliyun.ENI, error) {
	return m.cloud.ListENIs(ctx, aliyun.ENIFilter{Tags: m.baseTags(RoleMember)})
}

// Release detaches and deletes the pod's member ENI. A pod without one is not an error, so
// repeated DELs are harmless.
func (m *Manager) Release(ctx context.Context, podKey string) error {
	all, err := m.members(ctx)
	if err != nil {
		return fmt.Errorf("release trunk member of %s: list members: %w", podKey, err)
	}
	var errs []error
	for _, e := range all {
		if e.Tags[TagPod] == podKey {
			errs = append(errs, m.remove(ctx, e))
		}
	}
	return errors.Join(errs...)
}

func (m *Manager) remove(ctx context.Context, e aliyun.ENI) error {
	trunk := e.TrunkID
	if trunk == "" {
		trunk = m.Trunk().ID
	}
	switch e.Status {
	case aliyun.StatusDeleting:
		return nil // already going
	case aliyun.StatusAttaching:
		// An attach a killed agent left behind: let it finish (the call is idempotent and
		// waits), then take it apart like any member.
		if _, err := m.cloud.AttachMemberENI(ctx, e.ID, m.opts.InstanceID, trunk); err != nil {
			return fmt.Errorf("settle the attach of member ENI %s (pod %s) before removing it: %w", e.ID, e.Tags[TagPod], err)
		}
	}
	if e.Status != aliyun.StatusAvailable {
		if err := m.cloud.DetachMemberENI(ctx, e.ID, m.opts.InstanceID, trunk); err != nil {
			return fmt.Errorf("detach member ENI %s (pod %s) from trunk %s: %w", e.ID, e.Tags[TagPod], trunk, err)
		}
	}
	if err := m.cloud.DeleteENI(ctx, e.ID); err != nil {
		return fmt.Errorf("delete member ENI %s (pod %s): %w", e.ID, e.Tags[TagPod], err)
	}
	m.log.Info("member ENI released", zap.String("eni", e.ID), zap.String("pod", e.Tags[TagPod]))
	return nil
}

// GC removes the member ENIs of pods live no longer reports, and returns how many.
func (m *Manager) GC(ctx context.Context, live func(podKey string) bool) (int, error) {
	all, err := m.members(ctx)
	if err != nil {
		return 0, fmt.Errorf("trunk GC: list members: %w", err)
	}
	n := 0
	var errs []error
	for _, e := range all {
		if live(e.Tags[TagPod]) {
			continue
		}
		if err := m.remove(ctx, e); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// Teardown detaches and deletes the trunk ENI when the node leaves trunking; it refuses while
// members remain (their pods would lose their network).
func (m *Manager) Teardown(ctx context.Context) error {
	all, err := m.members(ctx)
	if err != nil {
		return fmt.Errorf("trunk teardown: list members: %w", err)
	}
	if len(all) > 0 {
		ids := make([]string, 0, len(all))
		for _, e := range all {
			ids = append(ids, e.ID+" (pod "+e.Tags[TagPod]+")")
		}
		return fmt.Errorf("trunk teardown: %d member ENIs remain: %s; delete their pods first", len(all), strings.Join(ids, ", "))
	}
	trunks, err := m.cloud.ListENIs(ctx, aliyun.ENIFilter{Tags: m.baseTags(RoleTrunk)})
	if err != nil {
		return fmt.Errorf("trunk teardown: list trunk ENIs: %w", err)
	}
	for _, t := range trunks {
		if t.Status != aliyun.StatusAvailable {
			if err := m.cloud.DetachENI(ctx, t.ID, m.opts.InstanceID); err != nil {
				return fmt.Errorf("trunk teardown: detach %s: %w", t.ID, err)
			}
		}
		if err := m.cloud.DeleteENI(ctx, t.ID); err != nil {
			return fmt.Errorf("trunk teardown: delete %s: %w", t.ID, err)
		}
	}
	m.mu.Lock()
	m.trunk = aliyun.ENI{}
	m.mu.Unlock()
	return nil
}
