package ternctl

import (
	"sort"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/tern-net/tern/agent/api"
)

// IPAMView is `ipam show`: the pool's limits and every ENI with each address and its pod.
type IPAMView struct {
	Node       string         `json:"node"`
	InstanceID string         `json:"instanceID"`
	Pool       api.PoolLimits `json:"pool"`
	InUse      int            `json:"inUse"`
	Idle       int            `json:"idle"`
	MaxPods    int            `json:"maxPods"`
	// ENIQuotaUsed and IPQuotaUsed are the fractions of the instance type's ENIs and pod
	// addresses the node holds (0..1).
	ENIQuotaUsed float64   `json:"eniQuotaUsed"`
	IPQuotaUsed  float64   `json:"ipQuotaUsed"`
	ENIs         []ENIView `json:"enis"`
}

// ENIView is one ENI of `ipam show`.
type ENIView struct {
	ID          string   `json:"id"`
	MAC         string   `json:"mac"`
	PrimaryIP   string   `json:"primaryIP,omitempty"`
	VSwitchID   string   `json:"vSwitchID,omitempty"`
	VSwitchCIDR string   `json:"vSwitchCIDR,omitempty"`
	IPs         []IPView `json:"ips"`
}

// IPView is one address of an ENI and the pod holding it (empty: idle).
type IPView struct {
	IP          string `json:"ip"`
	Pod         string `json:"pod,omitempty"` // namespace/name
	ContainerID string `json:"containerID,omitempty"`
}

func ipamShowCommand(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "show",
		Short: "ENIs with MAC and vSwitch, each address and the pod holding it, pool sizes and quota use (from the agent)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := e.client().State(cmd.Context())
			if err != nil {
				return e.agentErr("ask the agent for its pool", err)
			}
			v := ipamView(st)
			return e.render(v, func() *table {
				t := &table{header: []string{"ENI", "MAC", "VSWITCH", "IP", "POD"},
					pre: []string{"node " + v.Node + " (instance " + v.InstanceID + ", " + orDash(v.Pool.InstanceType) + "): " + ipamSummary(v), ""}}
				for _, en := range v.ENIs {
					vsw := orDash(en.VSwitchID)
					if en.VSwitchCIDR != "" {
						vsw += " (" + en.VSwitchCIDR + ")"
					}
					for _, ip := range en.IPs {
						ipcol := ip.IP
						if ip.IP == en.PrimaryIP {
							ipcol += " (primary)"
						}
						t.add(en.ID, en.MAC, vsw, ipcol, orDash(ip.Pod))
					}
				}
				return t
			})
		},
	}
}

func ipamView(st api.State) IPAMView {
	v := IPAMView{Node: st.NodeName, InstanceID: st.InstanceID, Pool: st.Pool, InUse: st.InUse, Idle: st.Idle,
		MaxPods: st.MaxPods, ENIs: []ENIView{}}
	if st.Pool.ENIQuota > 0 {
		v.ENIQuotaUsed = float64(len(st.ENIs)) / float64(st.Pool.ENIQuota)
	}
	if st.MaxPods > 0 {
		v.IPQuotaUsed = float64(st.InUse+st.Idle) / float64(st.MaxPods)
	}
	owner := map[string]IPView{}
	for k, a := range st.Allocations {
		parts := strings.SplitN(k, "/", 3)
		iv := IPView{IP: a.IP, Pod: k}
		if len(parts) == 3 {
			iv.Pod, iv.ContainerID = parts[0]+"/"+parts[1], parts[2]
		}
		owner[a.IP] = iv
	}
	for _, en := range st.ENIs {
		ev := ENIView{ID: en.ID, MAC: en.MAC, PrimaryIP: en.PrimaryIP, VSwitchID: en.VSwitchID, VSwitchCIDR: en.VSwitchCIDR, IPs: []IPView{}}
		ips := append([]string(nil), en.IPs...)
		sort.Strings(ips)
		for _, ip := range ips {
			iv, ok := owner[ip]
			if !ok {
				iv = IPView{IP: ip}
			}
			ev.IPs = append(ev.IPs, iv)
		}
		v.ENIs = append(v.ENIs, ev)
	}
	return v
}

// ipamSummary is the line status prints about the pool.
func ipamSummary(v IPAMView) string {
	return strconv.Itoa(v.InUse) + " in use, " + strconv.Itoa(v.Idle) + " idle (pool min " + strconv.Itoa(v.Pool.MinPoolSize) +
		", max " + strconv.Itoa(v.Pool.MaxPoolSize) + "), " + strconv.Itoa(len(v.ENIs)) + "/" + strconv.Itoa(v.Pool.ENIQuota) +
		" ENIs, at most " + strconv.Itoa(v.MaxPods) + " pods"
}
