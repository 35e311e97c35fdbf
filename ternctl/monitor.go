package ternctl

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/spf13/cobra"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"sigs.k8s.io/yaml"

	"github.com/tern-net/tern/loader"
)

// MonitorReading starts the line monitor prints on stderr once it reads the ring buffer:
// events from then on are its to show (tests wait for it; ternctl/ternctltest).
const MonitorReading = "monitoring drops from"

// DropEvent is one drop as `monitor -o json` prints it (one JSON object per line).
type DropEvent struct {
	Type        string         `json:"type"` // "drop"
	Time        time.Time      `json:"time"`
	Reason      string         `json:"reason"`
	Direction   string         `json:"direction"`
	IfIndex     uint32         `json:"ifindex"`
	Interface   string         `json:"interface,omitempty"`
	Pod         string         `json:"pod,omitempty"` // the source's or destination's namespace/name, when the agent answers
	Proto       string         `json:"protocol"`
	Source      netip.AddrPort `json:"source"`
	Destination netip.AddrPort `json:"destination"`
	Length      uint32         `json:"length"`
}

// PolicyEvent is one NetworkPolicy verdict as `monitor -o json` prints it: a denial, an
// audit would-deny, or (with the agent's networkPolicy.allowedEvents) an allowed new flow.
type PolicyEvent struct {
	Type      string    `json:"type"` // "policy"
	Time      time.Time `json:"time"`
	Verdict   string    `json:"verdict"`   // allowed, denied, audit (would be denied; passed)
	Direction string    `json:"direction"` // the pod's policy that judged: ingress or egress
	// Pod is the local pod the policy protects ("namespace/name" when the agent answers,
	// else its address); Peer the other end as judged (a Service flow's backend, not the
	// frontend) and Port the destination port judged (0 for ICMP).
	Pod          string     `json:"pod"`
	PodAddress   netip.Addr `json:"podAddress"`
	Peer         netip.Addr `json:"peer"`
	PeerPod      string     `json:"peerPod,omitempty"`
	PeerIdentity uint32     `json:"peerIdentity"`
	Port         uint16     `json:"port"`
	Proto        string     `json:"protocol"`
	// Policy is the policy that decided ("namespace/name" from tern_policy_names): the rule's
	// policy for an allow, the policy isolating the pod for a denial; "" when unknown.
	Policy    string `json:"policy"`
	Slot      uint32 `json:"slot"`
	IfIndex   uint32 `json:"ifindex"`
	Interface string `json:"interface,omitempty"`
	Length    uint32 `json:"length"`
}

// Event types `monitor --type` selects.
var monitorTypes = []string{"drop", "policy", "nat"}

// LostEvents reports events the datapath could not send since monitor started: over the
// per-CPU rate limit, or with the ring buffer full.
type LostEvents struct {
	Type       string `json:"type"` // "lost"
	RateLimit  uint64 `json:"rateLimit"`
	BufferFull uint64 `json:"bufferFull"`
}

type monitorFilter struct {
	pod     string
	reasons []string
	types   []string
	count   int
}

func monitorCommand(e *env) *cobra.Command {
	var f monitorFilter
	c := &cobra.Command{
		Use:   "monitor",
		Short: "Stream drops, NetworkPolicy verdicts and NAT failures live from the datapath's ring buffer (tern_events)",
		Long: `monitor prints, as it happens, from the tern_events ring buffer (works while the agent is
down; policy names come from the pinned tern_policy_names):
  drop    every packet the datapath drops, with its reason;
  policy  every NetworkPolicy denial (and audit would-deny) naming the pod, the peer, the
          port, the direction and the policy that decided; allowed new flows too when the
          agent runs with networkPolicy.allowedEvents;
  nat     masquerade drops: no free port (drop_snat_no_port) or tern_snat full.
The datapath sends at most 1,000 events per second per CPU (bursts of 200); what it could not
send is reported as lost. One monitor at a time: two readers of one ring buffer share its
events.`,
		Example: `  ternctl monitor
  ternctl monitor --pod default/web --type policy -o json
  ternctl monitor --pod default/web --reason drop_bad_ip -o json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return e.monitor(cmd.Context(), f) },
	}
	c.Flags().StringVar(&f.pod, "pod", "", "only drops to or from this pod (namespace/name, asked of the agent, or its address)")
	c.Flags().StringSliceVar(&f.reasons, "reason", nil, "only these reasons (drop_bad_ip, svc_reject, ...; repeat or comma-separate)")
	c.Flags().StringSliceVar(&f.types, "type", nil, "only these event types: drop, policy, nat (repeat or comma-separate)")
	_ = c.RegisterFlagCompletionFunc("type", func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return monitorTypes, cobra.ShellCompDirectiveNoFileComp
	})
	c.Flags().IntVar(&f.count, "count", 0, "exit after this many events (0: until interrupted)")
	_ = c.RegisterFlagCompletionFunc("pod", e.completePods)
	_ = c.RegisterFlagCompletionFunc("reason", func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		var out []string
		for _, r := range loader.Reasons() {
			out = append(out, r.String())
		}
		return out, cobra.ShellCompDirectiveNoFileComp
	})
	return c
}

func monotonicNow() (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("read the monotonic clock: %w", err)
	}
	return time.Duration(ts.Nano()), nil
}

func (e *env) monitor(ctx context.Context, f monitorFilter) error {
	known := map[string]bool{}
	for _, r := range loader.Reasons() {
		known[r.String()] = true
	}
	for _, r := range f.reasons {
		if !known[r] {
			names := make([]string, 0, len(known))
			for n := range known {
				names = append(names, n)
			}
			slices.Sort(names)
			return usageErr("--reason %q is not a reason (reasons: %s)", r, strings.Join(names, ", "))
		}
	}
	for _, t := range f.types {
		if !slices.Contains(monitorTypes, t) {
			return usageErr("--type %q is not an event type (types: %s)", t, strings.Join(monitorTypes, ", "))
		}
	}
	var podAddr netip.Addr
	if f.pod != "" {
		a, err := e.podAddr(ctx, f.pod)
		if err != nil {
			return err
		}
		podAddr = a
	}
	// The reader moves the consumer position, so the ring buffer is opened writable.
	events, err := ebpf.LoadPinnedMap(filepath.Join(e.opts.PinRoot, loader.PodMapTernEvents), nil)
	if err != nil {
		return e.pinErr(fmt.Errorf("open the ring buffer %s under %s (an agent older than ternctl monitor has none): %w",
			loader.PodMapTernEvents, e.opts.PinRoot, err))
	}
	defer events.Close()
	limits, err := ebpf.LoadPinnedMap(filepath.Join(e.opts.PinRoot, loader.PodMapTernEventLimit), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return e.pinErr(fmt.Errorf("open %s under %s: %w", loader.PodMapTernEventLimit, e.opts.PinRoot, err))
	}
	defer limits.Close()
	rd, err := ringbuf.NewReader(events)
	if err != nil {
		return withCode(ExitFailure, fmt.Errorf("read ring buffer %s: %w", loader.PodMapTernEvents, err))
	}
	defer rd.Close()

	// Events already in the buffer are older than this monitor: skip them.
	start, err := monotonicNow()
	if err != nil {
		return err
	}
	lostBase, err := readLost(limits)
	if err != nil {
		return withCode(ExitFailure, err)
	}
	lostSeen := lostBase
	names := e.podNames(ctx)
	// Policy names by slot, read again when an event names a slot not seen yet (a policy
	// created after monitor started).
	policyNames := map[uint32]string{}
	policyName := func(slot uint32) string {
		if slot == 0 {
			return ""
		}
		if n, ok := policyNames[slot]; ok {
			return n
		}
		m, err := e.openMap(loader.PodMapTernPolicyNames)
		if err != nil {
			return ""
		}
		defer m.Close()
		var n loader.PolicyName
		if m.Lookup(slot, &n) == nil {
			policyNames[slot] = n.String()
		}
		return policyNames[slot]
	}
	ifnames := map[uint32]string{}
	ifname := func(i uint32) string {
		if n, ok := ifnames[i]; ok {
			return n
		}
		n := ""
		if l, err := netlink.LinkByIndex(int(i)); err == nil {
			n = l.Attrs().Name
		}
		ifnames[i] = n
		return n
	}
	// Said on stderr so that a JSON or YAML stream on stdout stays parseable.
	fmt.Fprintf(e.stderr, "%s %s (interrupt to stop)\n", MonitorReading, filepath.Join(e.opts.PinRoot, loader.PodMapTernEvents))
	if e.opts.Output == "table" {
		fmt.Fprintf(e.stdout, "%-26s %-22s %-11s %-16s %-5s %-21s %-21s %s\n", "TIME", "REASON", "DIRECTION", "INTERFACE", "PROTO", "SOURCE", "DESTINATION", "POD")
	}
	seen := 0
	var rec ringbuf.Record
	for {
		if ctx.Err() != nil {
			return nil // interrupted: a normal end of a stream
		}
		// Wake at least every 200 ms to notice the interrupt and new lost counts.
		rd.SetDeadline(time.Now().Add(200 * time.Millisecond))
		err := rd.ReadInto(&rec)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			lost, err := readLost(limits)
			if err != nil {
				return withCode(ExitFailure, err)
			}
			if lost != lostSeen {
				lostSeen = lost
				if err := e.emit(LostEvents{Type: "lost", RateLimit: lost.RateLimit - lostBase.RateLimit, BufferFull: lost.BufferFull - lostBase.BufferFull}); err != nil {
					return err
				}
			}
			continue
		}
		if err != nil {
			return withCode(ExitFailure, fmt.Errorf("read ring buffer %s: %w", loader.PodMapTernEvents, err))
		}
		var raw loader.DropEvent
		if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &raw); err != nil {
			return withCode(ExitFailure, fmt.Errorf("decode a %d-byte event (ternctl and the datapath's versions differ?): %w", len(rec.RawSample), err))
		}
		if time.Duration(raw.TsNs) < start {
			continue
		}
		var ev any
		var evTime *time.Time
		if raw.Kind == loader.EventKindPolicy {
			var pe loader.PolicyEvent
			if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &pe); err != nil {
				return withCode(ExitFailure, fmt.Errorf("decode a %d-byte policy event (ternctl and the datapath's versions differ?): %w", len(rec.RawSample), err))
			}
			// The pod is the side of the packet on the pod's veth: the sender for from-pod.
			podA := loader.BEToAddr(raw.Daddr)
			if raw.Dir == loader.DirFromPod {
				podA = loader.BEToAddr(raw.Saddr)
			}
			// A local exclusive-ENI backend's ingress is judged where the client's flow
			// opens (the client's from-pod, or from-netdev), before the translation: the
			// packet names the client and the frontend, the pod is the subject identity's.
			if raw.Dir == loader.DirFromNetdev || podA == loader.BEToAddr(pe.Peer) {
				podA = e.exclusivePodOf(pe.Subject)
			}
			pv := PolicyEvent{Type: "policy", Verdict: "denied", Direction: policyDir(pe.PolicyDir), Pod: names[podA], PodAddress: podA,
				Peer: loader.BEToAddr(pe.Peer), PeerIdentity: pe.PeerIdentity, Port: loader.BEToPort(pe.Port), Proto: Proto(raw.Proto),
				Policy: policyName(pe.Slot), Slot: pe.Slot, IfIndex: raw.Ifindex, Interface: ifname(raw.Ifindex), Length: raw.Len}
			if pv.Pod == "" {
				pv.Pod = podA.String()
				if !podA.IsValid() {
					pv.Pod = fmt.Sprintf("identity %d", pe.Subject)
				}
			}
			pv.PeerPod = names[pv.Peer]
			switch raw.Reason {
			case loader.ReasonPolicyAllowed:
				pv.Verdict = "allowed"
			case loader.ReasonPolicyAudit:
				pv.Verdict = "audit"
			}
			if !f.wants("policy", raw.Reason.String()) {
				continue
			}
			if podAddr.IsValid() && pv.PodAddress != podAddr && pv.Peer != podAddr {
				continue
			}
			evTime = &pv.Time
			ev = &pv
		} else {
			de := DropEvent{Type: "drop", Reason: raw.Reason.String(), Direction: raw.Dir.String(), IfIndex: raw.Ifindex,
				Interface: ifname(raw.Ifindex), Proto: Proto(raw.Proto), Source: ap(raw.Saddr, raw.Sport),
				Destination: ap(raw.Daddr, raw.Dport), Length: raw.Len}
			if raw.Reason == loader.ReasonDropSNATNoPort || raw.Reason == loader.ReasonDropSNATFull {
				de.Type = "nat"
			}
			if !f.wants(de.Type, de.Reason) {
				continue
			}
			if podAddr.IsValid() && de.Source.Addr() != podAddr && de.Destination.Addr() != podAddr {
				continue
			}
			if n, ok := names[de.Source.Addr()]; ok {
				de.Pod = n
			} else if n, ok := names[de.Destination.Addr()]; ok {
				de.Pod = n
			}
			evTime = &de.Time
			ev = &de
		}
		if now, err := monotonicNow(); err == nil {
			*evTime = time.Now().Add(time.Duration(raw.TsNs) - now)
		}
		if err := e.emit(ev); err != nil {
			return err
		}
		seen++
		if f.count > 0 && seen >= f.count {
			return nil
		}
	}
}

// emit prints one stream item: a table line, a JSON line, or a YAML document.
func (e *env) emit(v any) error {
	switch e.opts.Output {
	case "json":
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(e.stdout, "%s\n", b)
		return err
	case "yaml":
		b, err := yaml.Marshal(v)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(e.stdout, "---\n%s", b)
		return err
	}
	switch x := v.(type) {
	case *DropEvent:
		_, err := fmt.Fprintf(e.stdout, "%-26s %-22s %-11s %-16s %-5s %-21s %-21s %s\n", x.Time.Format(time.RFC3339Nano),
			x.Reason, x.Direction, orDash(x.Interface), x.Proto, x.Source, x.Destination, orDash(x.Pod))
		return err
	case *PolicyEvent:
		peer := x.Peer.String()
		if x.PeerPod != "" {
			peer += " (" + x.PeerPod + ")"
		}
		policy := x.Policy
		if policy == "" {
			policy = fmt.Sprintf("slot %d", x.Slot)
		}
		_, err := fmt.Fprintf(e.stdout, "%-26s policy %-8s %-7s pod %s %s peer %s port %s/%d by %s\n", x.Time.Format(time.RFC3339Nano),
			x.Verdict, x.Direction, x.Pod, map[string]string{"ingress": "<-", "egress": "->"}[x.Direction], peer, x.Proto, x.Port, policy)
		return err
	case LostEvents:
		_, err := fmt.Fprintf(e.stdout, "-- lost since start: %d over the rate limit, %d with the ring buffer full\n", x.RateLimit, x.BufferFull)
		return err
	}
	return nil
}

// wants tells whether an event of type typ and reason passes --type and --reason.
func (f monitorFilter) wants(typ, reason string) bool {
	if len(f.types) > 0 && !slices.Contains(f.types, typ) {
		return false
	}
	return len(f.reasons) == 0 || slices.Contains(f.reasons, reason)
}

func policyDir(d uint8) string {
	if d == 1 {
		return "ingress"
	}
	return "egress"
}

// readLost sums the per-CPU lost counts.
func readLost(m *ebpf.Map) (LostEvents, error) {
	var per []loader.EventLimit
	if err := m.Lookup(uint32(0), &per); err != nil {
		return LostEvents{}, fmt.Errorf("read %s: %w", loader.PodMapTernEventLimit, err)
	}
	l := LostEvents{Type: "lost"}
	for _, p := range per {
		l.RateLimit += p.LostRate
		l.BufferFull += p.LostFull
	}
	return l, nil
}
