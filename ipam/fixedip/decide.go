// Package fixedip keeps a StatefulSet pod's address across restarts and across nodes of one
// zone (Terway's annotation k8s.aliyun.com/pod-ip-fixed: "true"). The state is one FixedIP
// record per pod in the apiserver (namespace/name → address, node, ENI, vSwitch, zone,
// phase), so any node can take a pod's address over; this file holds the decisions, pure
// functions over plain values, and manager.go carries them out with the pool, the cloud and
// the records.
package fixedip

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Annotation marks a pod (set it on the StatefulSet's pod template) whose address is kept.
const Annotation = "k8s.aliyun.com/pod-ip-fixed"

// Phase is where a record's address is in its life.
type Phase string

const (
	// PhaseInUse: a sandbox of the pod on Node has the address.
	PhaseInUse Phase = "InUse"
	// PhaseHeld: the pod has no sandbox; Node keeps the address on its ENI until ReleaseAfter.
	PhaseHeld Phase = "Held"
	// PhaseMoving: Node claimed the address from PreviousNode and is moving it to its own ENI
	// (unassign from PreviousENI, assign by name on one of its ENIs).
	PhaseMoving Phase = "Moving"
)

// Record is the apiserver's record of one pod's fixed address.
type Record struct {
	Namespace, Name string
	IP              netip.Addr
	VSwitchID       string
	ZoneID          string
	Node            string // the node whose ENI has (or is getting) the address
	ENIID           string // that ENI; "" while Moving
	PodUID          string // the pod the address was last given to
	Phase           Phase
	ReleaseAfter    time.Time // Held: when the address goes back to the pool
	PreviousNode    string    // Moving: the node it comes from
	PreviousENI     string    // Moving: the ENI to unassign it from
	StatefulSet     string    // the owning StatefulSet's name
	// ResourceVersion makes every write conditional: two nodes never both claim one record.
	ResourceVersion string
}

// Pod is what the decisions need of a pod.
type Pod struct {
	Namespace, Name, UID string
	Fixed                bool   // the annotation is "true"
	StatefulSet          string // controller owner of kind StatefulSet; "" for none
	Ordinal              int    // from the name's "-N" suffix; -1 when it has none
}

// Node is this node as the decisions see it.
type Node struct {
	Name string
	Zone string
}

// Action is what to do for an ADD of a fixed pod.
type Action int

const (
	// Allocate: no record: take any address from the pool, then create the record.
	Allocate Action = iota
	// TakeHere: the record is this node's: take the address from the pool (held here, or
	// assigned by name again) and mark the record InUse.
	TakeHere
	// Claim: the address is on another node's ENI and that node's pod is gone: claim the
	// record (conditional update to Moving), unassign it there, assign it here.
	Claim
	// Wait: another node's sandbox of this very pod still has it (a move under way, or the
	// old node's release not seen yet): the ADD is answered "try again".
	Wait
	// Refuse: the address cannot come to this node (another zone): an Event says where the
	// pod must run; retrying here does not help.
	Refuse
)

func (a Action) String() string {
	return [...]string{"allocate", "take-here", "claim", "wait", "refuse"}[a]
}

// Decision is an Action with the reason an operator reads in the log or an Event.
type Decision struct {
	Action Action
	Reason string
}

// DecideAdd says how an ADD of pod p on node n gets its address, given its record (nil: none).
func DecideAdd(rec *Record, p Pod, n Node) Decision {
	if rec == nil {
		return Decision{Allocate, "no fixed address recorded yet: the pod gets one from the pool and keeps it"}
	}
	if rec.ZoneID != "" && n.Zone != "" && rec.ZoneID != n.Zone {
		return Decision{Refuse, fmt.Sprintf("fixed address %s is in vSwitch %s of zone %s, and node %s is in zone %s: an address cannot leave its zone; run the pod in zone %s (node affinity on topology.kubernetes.io/zone), or delete the FixedIP %s/%s to give it a new address",
			rec.IP, rec.VSwitchID, rec.ZoneID, n.Name, n.Zone, rec.ZoneID, rec.Namespace, rec.Name)}
	}
	if rec.Node == n.Name {
		return Decision{TakeHere, fmt.Sprintf("fixed address %s is on this node (%s)", rec.IP, rec.Phase)}
	}
	if rec.Phase == PhaseHeld {
		return Decision{Claim, fmt.Sprintf("fixed address %s is held on node %s for this pod: moving it here", rec.IP, rec.Node)}
	}
	if rec.PodUID != "" && rec.PodUID != p.UID {
		// One name, one pod object: the pod that had the address is gone from the apiserver.
		return Decision{Claim, fmt.Sprintf("fixed address %s is %s on node %s for an earlier pod (uid %s), which no longer exists: moving it here",
			rec.IP, rec.Phase, rec.Node, rec.PodUID)}
	}
	return Decision{Wait, fmt.Sprintf("fixed address %s is %s on node %s for this same pod (uid %s); waiting for that node to let it go",
		rec.IP, rec.Phase, rec.Node, p.UID)}
}

// HoldAction is what a node does with an address it holds for a pod without a sandbox.
type HoldAction int

const (
	// Keep the hold.
	Keep HoldAction = iota
	// Release the address to the pool (then the normal release rules apply) and delete the
	// record: the hold time passed, or the StatefulSet no longer has the ordinal.
	Release
	// Forget the address without a cloud call: another node took it over.
	Forget
	// Drop the hold to the pool without touching any record: no record names this address
	// for the pod (it was deleted, or gives the pod another address).
	Drop
)

func (a HoldAction) String() string { return [...]string{"keep", "release", "forget", "drop"}[a] }

// SetState is what the owning StatefulSet says about an ordinal.
type SetState struct {
	Exists   bool
	Replicas int
}

// DecideHold says what node n does with the hold of address ip for pod ns/name, given its
// record (nil: none), the StatefulSet's state and the time.
func DecideHold(ip netip.Addr, rec *Record, ordinal int, set SetState, n Node, now time.Time) (HoldAction, string) {
	switch {
	case rec == nil:
		return Drop, "no FixedIP record names it any more"
	case rec.IP != ip:
		return Drop, fmt.Sprintf("the FixedIP record names %s instead", rec.IP)
	case rec.Node != n.Name:
		return Forget, fmt.Sprintf("node %s took it over (%s)", rec.Node, rec.Phase)
	case rec.Phase != PhaseHeld:
		return Keep, "a sandbox is being set up with it"
	case !set.Exists:
		return Release, fmt.Sprintf("StatefulSet %s is gone", rec.StatefulSet)
	case ordinal >= set.Replicas:
		return Release, fmt.Sprintf("StatefulSet %s scaled to %d replicas, below ordinal %d", rec.StatefulSet, set.Replicas, ordinal)
	case !now.Before(rec.ReleaseAfter):
		return Release, fmt.Sprintf("held since the pod was deleted, past the hold time (release after %s)", rec.ReleaseAfter.UTC().Format(time.RFC3339))
	}
	return Keep, "within the hold time"
}

// Ordinal parses a StatefulSet pod's ordinal from its name (<set>-<N>); -1 when the name is
// not the set's.
func Ordinal(podName, set string) int {
	rest, ok := strings.CutPrefix(podName, set+"-")
	if !ok {
		return -1
	}
	n, err := strconv.Atoi(rest)
	if err != nil || n < 0 || strconv.Itoa(n) != rest {
		return -1
	}
	return n
}
