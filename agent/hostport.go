package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/endpoint"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/lbmap"
)

// Sandboxes and their hostPorts.
//
// Every sandbox tern-cni attaches is recorded here: its host interface (which DEL needs in
// chaining mode, where the interface is the first plugin's and its name is not derived
// from the container ID) and its hostPorts (the CNI portMappings capability). The table is
// a JSON file written before the maps change on ADD and after they change on DEL, so after
// a crash the file holds at least what the maps hold; the next agent drops the records
// whose host veth is gone and hands the rest to the Service reconciler before the first
// Service sync (lbmap.Reconciler.SetExtra), so hostPorts are never deleted by it.
//
// A hostPort becomes a load-balancer frontend, address:hostPort/protocol →
// podIP:containerPort, in the same maps as the Services: the pod program translates it for
// pods, the socket hooks for host-network processes, and the netdev programs for clients
// outside the node (once they serve NodePort). An empty hostIP means every IPv4 address of
// the node, read when the hostPorts change (the portmap plugin's "--dst-type LOCAL"); no
// iptables.

// sandboxRecord is one attached sandbox.
type sandboxRecord struct {
	ContainerID  string            `json:"containerID"`
	IfName       string            `json:"ifName"`
	Pod          string            `json:"pod,omitempty"` // namespace/name
	IfIndex      int               `json:"ifIndex"`       // the host veth
	IP           netip.Addr        `json:"ip"`
	Chained      bool              `json:"chained,omitempty"`
	PortMappings []api.PortMapping `json:"portMappings,omitempty"`
}

func sandboxID(containerID, ifName string) string { return containerID + "/" + ifName }

// sandboxTable is the recorded sandboxes, kept in a file.
type sandboxTable struct {
	path string

	mu   sync.Mutex
	recs map[string]sandboxRecord
}

type sandboxFile struct {
	Version   int             `json:"version"`
	Sandboxes []sandboxRecord `json:"sandboxes"`
}

// openSandboxTable reads the table at path; a missing file is an empty table.
func openSandboxTable(path string) (*sandboxTable, error) {
	t := &sandboxTable{path: path, recs: map[string]sandboxRecord{}}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return t, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the sandbox table %s: %w", path, err)
	}
	var f sandboxFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("parse the sandbox table %s: %w (move it away to start with an empty table; hostPorts of running pods then come back with their next CNI ADD)", path, err)
	}
	for _, r := range f.Sandboxes {
		t.recs[sandboxID(r.ContainerID, r.IfName)] = r
	}
	return t, nil
}

// saveLocked writes the table atomically (a reader never sees half a file).
func (t *sandboxTable) saveLocked() error {
	f := sandboxFile{Version: 1, Sandboxes: make([]sandboxRecord, 0, len(t.recs))}
	for _, r := range t.recs {
		f.Sandboxes = append(f.Sandboxes, r)
	}
	sort.Slice(f.Sandboxes, func(i, j int) bool {
		return sandboxID(f.Sandboxes[i].ContainerID, f.Sandboxes[i].IfName) < sandboxID(f.Sandboxes[j].ContainerID, f.Sandboxes[j].IfName)
	})
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(t.path), 0o700); err != nil {
		return fmt.Errorf("create the directory of the sandbox table %s: %w", t.path, err)
	}
	tmp := t.path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("write the sandbox table: %w", err)
	}
	if err := os.Rename(tmp, t.path); err != nil {
		return fmt.Errorf("install the sandbox table %s: %w", t.path, err)
	}
	return nil
}

// list returns a copy of the records.
func (t *sandboxTable) list() []sandboxRecord {
	if t == nil {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]sandboxRecord, 0, len(t.recs))
	for _, r := range t.recs {
		out = append(out, r)
	}
	return out
}

// put records r, after checking with check (the hostPort clashes) that the table it
// makes is acceptable.
func (t *sandboxTable) put(r sandboxRecord, check func([]sandboxRecord) error) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	id := sandboxID(r.ContainerID, r.IfName)
	old, had := t.recs[id]
	t.recs[id] = r
	if check != nil {
		all := make([]sandboxRecord, 0, len(t.recs))
		for _, x := range t.recs {
			all = append(all, x)
		}
		if err := check(all); err != nil {
			t.restoreLocked(id, old, had)
			return err
		}
	}
	if err := t.saveLocked(); err != nil {
		t.restoreLocked(id, old, had)
		return err
	}
	return nil
}

func (t *sandboxTable) restoreLocked(id string, old sandboxRecord, had bool) {
	if had {
		t.recs[id] = old
	} else {
		delete(t.recs, id)
	}
}

// remove drops the records match selects and saves; it returns them.
func (t *sandboxTable) remove(match func(sandboxRecord) bool) ([]sandboxRecord, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var gone []sandboxRecord
	for id, r := range t.recs {
		if match(r) {
			gone = append(gone, r)
			delete(t.recs, id)
		}
	}
	if len(gone) == 0 {
		return nil, nil
	}
	return gone, t.saveLocked()
}

// portMapping is a checked api.PortMapping.
type portMapping struct {
	hostIP        netip.Addr // invalid: every node address
	hostPort      uint16
	containerPort uint16
	proto         service.Protocol
}

// parsePortMappings checks the runtime's mappings. IPv6 host addresses are skipped, as the
// portmap plugin skips mappings of the other family: tern's Service maps are IPv4.
func parsePortMappings(in []api.PortMapping) ([]portMapping, error) {
	var out []portMapping
	var errs []error
	for _, m := range in {
		pm := portMapping{hostPort: uint16(m.HostPort), containerPort: uint16(m.ContainerPort)}
		if m.HostPort < 1 || m.HostPort > 65535 || m.ContainerPort < 1 || m.ContainerPort > 65535 {
			errs = append(errs, fmt.Errorf("portMapping %d→%d: ports must be 1–65535", m.HostPort, m.ContainerPort))
			continue
		}
		switch strings.ToLower(m.Protocol) {
		case "", "tcp":
			pm.proto = service.TCP
		case "udp":
			pm.proto = service.UDP
		default:
			errs = append(errs, fmt.Errorf("portMapping %d→%d: protocol %q is not tcp or udp (tern's datapath has no SCTP)", m.HostPort, m.ContainerPort, m.Protocol))
			continue
		}
		if m.HostIP != "" && m.HostIP != "0.0.0.0" && m.HostIP != "::" {
			a, err := netip.ParseAddr(m.HostIP)
			if err != nil {
				errs = append(errs, fmt.Errorf("portMapping %d→%d: hostIP %q is not an IP address", m.HostPort, m.ContainerPort, m.HostIP))
				continue
			}
			if !a.Is4() {
				continue
			}
			pm.hostIP = a
		} else if m.HostIP == "::" {
			continue
		}
		out = append(out, pm)
	}
	return out, errors.Join(errs...)
}

// hostPortState turns the records into load-balancer frontends. Two sandboxes claiming the
// same address, port and protocol is an error naming both (the scheduler keeps hostPorts
// apart; two at once means a stale record or a pod placed by hand).
func hostPortState(recs []sandboxRecord, nodeAddrs []netip.Addr) (service.State, error) {
	out := service.State{}
	owner := map[service.Frontend]string{}
	var errs []error
	sort.Slice(recs, func(i, j int) bool {
		return sandboxID(recs[i].ContainerID, recs[i].IfName) < sandboxID(recs[j].ContainerID, recs[j].IfName)
	})
	for _, r := range recs {
		pms, err := parsePortMappings(r.PortMappings)
		if err != nil {
			errs = append(errs, fmt.Errorf("sandbox %s: %w", r.ContainerID, err))
		}
		for _, pm := range pms {
			addrs := nodeAddrs
			if pm.hostIP.IsValid() {
				addrs = []netip.Addr{pm.hostIP}
			}
			for _, a := range addrs {
				f := service.Frontend{Addr: a, Port: pm.hostPort, Proto: pm.proto}
				b := service.Backend{Addr: r.IP, Port: pm.containerPort}
				if o, taken := owner[f]; taken && o != r.ContainerID {
					errs = append(errs, fmt.Errorf("hostPort %s of pod %s (sandbox %s) is already taken by sandbox %s", f, r.Pod, r.ContainerID, o))
					continue
				}
				owner[f] = r.ContainerID
				out[f] = []service.Backend{b}
			}
		}
	}
	return out, errors.Join(errs...)
}

// nodeAddresses lists the node's IPv4 addresses that a hostPort without hostIP answers on:
// every global address of the agent's namespace (loopback aside).
func nodeAddresses() ([]netip.Addr, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list the node's addresses for hostPorts: %w", err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if !ok || ip.IsLoopback() || a.Scope != int(netlink.SCOPE_UNIVERSE) {
			continue
		}
		out = append(out, ip)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Less(out[j]) })
	return out, nil
}

// startServiceMaps builds the LB maps' reconciler (the Service controller and the hostPorts
// share it) and restores the recorded hostPorts: those of live sandboxes stay, those whose
// host veth went while no agent ran are removed.
func (a *Agent) startServiceMaps(dp *loader.Datapath) error {
	rec, err := lbmap.NewReconciler(a.lbMaps(dp), a.log.Named("lbmap"))
	if err != nil {
		return fmt.Errorf("service reconciler: %w", err)
	}
	table, err := openSandboxTable(a.cfg.SandboxStatePath)
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.svcRec, a.attached = rec, table
	a.mu.Unlock()
	// Every recorded hostPort first, so that the reconciler knows them as its extra
	// frontends; then the gone ones leave through the normal path.
	if err := a.applyHostPorts(); err != nil {
		a.log.Warn("not every recorded hostPort could be restored", zap.Error(err))
	}
	gone := 0
	if err := a.dropSandboxes(func(r sandboxRecord) bool {
		if hostVethAlive(r.IfIndex) {
			return false
		}
		gone++
		return true
	}); err != nil {
		return fmt.Errorf("forget sandboxes whose host veth is gone: %w", err)
	}
	a.log.Info("sandbox table loaded", zap.String("path", a.cfg.SandboxStatePath),
		zap.Int("sandboxes", len(table.list())), zap.Int("forgotten", gone))
	return nil
}

// applyHostPorts hands every recorded hostPort to the reconciler. Called with hostPortMu
// held or before the socket serves attach requests.
func (a *Agent) applyHostPorts() error {
	table, _ := a.sandboxState()
	return a.applyHostPortsOf(table.list())
}

// sandboxState is the sandbox table and the LB reconciler; both nil until Run has loaded
// the datapath.
func (a *Agent) sandboxState() (*sandboxTable, *lbmap.Reconciler) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.attached, a.svcRec
}

func (a *Agent) applyHostPortsOf(recs []sandboxRecord) error {
	_, rec := a.sandboxState()
	if rec == nil {
		return nil
	}
	if !a.cfg.HostPortEnabled() {
		return rec.SetExtra(nil)
	}
	addrs, err := nodeAddresses()
	if err != nil {
		return err
	}
	st, serr := hostPortState(recs, addrs)
	return errors.Join(serr, rec.SetExtra(st))
}

// recordSandbox records an attached sandbox and writes its hostPorts: the file first, then
// the maps, so the file always holds at least what the maps hold. A hostPort another
// sandbox holds refuses the whole record.
func (a *Agent) recordSandbox(r sandboxRecord) error {
	a.hostPortMu.Lock()
	defer a.hostPortMu.Unlock()
	var addrs []netip.Addr
	if a.cfg.HostPortEnabled() && len(r.PortMappings) > 0 {
		var err error
		if addrs, err = nodeAddresses(); err != nil {
			return err
		}
		if _, err := parsePortMappings(r.PortMappings); err != nil {
			return err
		}
	}
	check := func(all []sandboxRecord) error {
		if len(addrs) == 0 && len(r.PortMappings) == 0 {
			return nil
		}
		var others []sandboxRecord
		for _, x := range all {
			if sandboxID(x.ContainerID, x.IfName) != sandboxID(r.ContainerID, r.IfName) {
				others = append(others, x)
			}
		}
		taken, _ := hostPortState(others, addrs)
		mine, err := hostPortState([]sandboxRecord{r}, addrs)
		if err != nil {
			return err
		}
		for f := range mine {
			if _, clash := taken[f]; clash {
				return fmt.Errorf("hostPort %s is already held by another pod on this node; a hostPort serves one pod (the scheduler keeps them apart, so the other is likely a stale sandbox: check `ternctl` or the runtime)", f)
			}
		}
		return nil
	}
	table, _ := a.sandboxState()
	if table == nil {
		return errors.New("tern-agent is starting: the sandbox table is not loaded yet; try again")
	}
	if err := table.put(r, check); err != nil {
		return err
	}
	if len(r.PortMappings) == 0 {
		return nil
	}
	return a.applyHostPorts()
}

// dropSandboxes forgets the records match selects and removes their hostPorts: the maps
// first, then the file.
func (a *Agent) dropSandboxes(match func(sandboxRecord) bool) error {
	a.hostPortMu.Lock()
	defer a.hostPortMu.Unlock()
	table, _ := a.sandboxState()
	if table == nil {
		return nil
	}
	var keep []sandboxRecord
	drop := map[string]bool{}
	hadPorts := false
	for _, r := range table.list() {
		if match(r) {
			drop[sandboxID(r.ContainerID, r.IfName)] = true
			hadPorts = hadPorts || len(r.PortMappings) > 0
			continue
		}
		keep = append(keep, r)
	}
	if len(drop) == 0 {
		return nil
	}
	var errs []error
	if hadPorts {
		errs = append(errs, a.applyHostPortsOf(keep))
	}
	_, err := table.remove(func(r sandboxRecord) bool { return drop[sandboxID(r.ContainerID, r.IfName)] })
	return errors.Join(append(errs, err)...)
}

// recordAttach records the sandbox of an attach request (and so its hostPorts) before its
// programs go on the veth. A request without a container ID (an older plugin) is not
// recorded.
func (a *Agent) recordAttach(req api.AttachRequest, ep endpoint.Endpoint) *api.Error {
	if req.ContainerID == "" {
		if len(req.PortMappings) > 0 {
			return &api.Error{Code: api.CodeInvalidConfig, Msg: "attach: portMappings need the sandbox's containerID (and ifName), which DEL removes them by"}
		}
		return nil
	}
	if table, _ := a.sandboxState(); table == nil {
		return &api.Error{Code: api.CodeTryAgainLater, Msg: "tern-agent is starting: the sandbox table is not loaded yet; try again"}
	}
	r := sandboxRecord{ContainerID: req.ContainerID, IfName: req.IfName, IfIndex: req.IfIndex, IP: ep.Addr,
		Chained: req.Chained, PortMappings: req.PortMappings}
	if req.Namespace != "" {
		r.Pod = req.Namespace + "/" + req.Name
	}
	if len(r.PortMappings) > 0 {
		if !a.cfg.HostPortEnabled() {
			// The conflist may also run the portmap plugin, which does them.
			a.log.Info("hostPort is off on this node (hostPort.enabled, kube-proxy-replacement): ignoring the sandbox's portMappings",
				zap.String("pod", r.Pod), zap.Int("mappings", len(r.PortMappings)))
			r.PortMappings = nil
		} else if !ep.Addr.IsValid() {
			return &api.Error{Code: api.CodeInvalidConfig, Msg: "attach: portMappings need the pod's ip"}
		}
	}
	if err := a.recordSandbox(r); err != nil {
		return &api.Error{Code: api.CodeInvalidConfig, Msg: fmt.Sprintf("attach: hostPorts of pod %s", r.Pod), Details: err.Error()}
	}
	return nil
}

// detachTarget resolves a detach request to the host veth to detach from and forgets the
// sandbox's record (and hostPorts). A request names the sandbox (containerID, ifName: the
// chained DEL, which does not know the veth), the veth, or both. 0 means nothing is left to
// detach.
func (a *Agent) detachTarget(req api.AttachRequest) (int, *api.Error) {
	if req.ContainerID == "" {
		if req.IfIndex <= 0 {
			return 0, &api.Error{Code: api.CodeInvalidConfig, Msg: fmt.Sprintf("detach: ifIndex %d is not a valid interface index (want the host veth's, > 0), and no containerID names the sandbox", req.IfIndex)}
		}
		return req.IfIndex, nil
	}
	if err := api.ValidateContainerID(req.ContainerID); err != nil {
		return 0, &api.Error{Code: api.CodeInvalidEnv, Msg: "detach: " + err.Error()}
	}
	ifindex := req.IfIndex
	mine := func(r sandboxRecord) bool {
		return r.ContainerID == req.ContainerID && (req.IfName == "" || r.IfName == req.IfName)
	}
	table, _ := a.sandboxState()
	for _, r := range table.list() {
		if mine(r) && ifindex <= 0 {
			ifindex = r.IfIndex
		}
	}
	if err := a.dropSandboxes(mine); err != nil {
		return 0, &api.Error{Code: api.CodeDatapath, Msg: "detach: remove the sandbox's hostPorts", Details: err.Error()}
	}
	return max(ifindex, 0), nil
}

// gcChained is CNI GC without tern's IPAM: every recorded sandbox the runtime no longer
// lists is detached and its hostPorts removed.
func (a *Agent) gcChained(valid map[string]bool) (api.GCResponse, error) {
	var out api.GCResponse
	var errs []error
	table, _ := a.sandboxState()
	for _, r := range table.list() {
		if valid[r.ContainerID] {
			continue
		}
		if hostVethAlive(r.IfIndex) {
			if err := a.detach(r.IfIndex); err != nil {
				errs = append(errs, fmt.Errorf("GC of sandbox %s: %w", r.ContainerID, err))
				continue
			}
		}
		if err := a.dropSandboxes(func(x sandboxRecord) bool { return x.ContainerID == r.ContainerID && x.IfName == r.IfName }); err != nil {
			errs = append(errs, fmt.Errorf("GC of sandbox %s: %w", r.ContainerID, err))
			continue
		}
		ref := api.PodRef{ContainerID: r.ContainerID, IfName: r.IfName}
		if ns, name, ok := strings.Cut(r.Pod, "/"); ok {
			ref.Namespace, ref.Name = ns, name
		}
		out.Released = append(out.Released, ref)
	}
	return out, errors.Join(errs...)
}
