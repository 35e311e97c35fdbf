package loader

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// PortRange is an inclusive range of ports.
type PortRange struct {
	Min, Max uint16
}

func (r PortRange) String() string { return fmt.Sprintf("%d-%d", r.Min, r.Max) }

// noPorts is an empty range: as Config.LocalPortRange, no window (the zero value would mean
// Linux's default).
func noPorts() PortRange { return PortRange{Min: 1, Max: 0} }

// count is how many ports r holds (0 for an empty range: Min > Max), as the datapath's
// 16-bit count (a range is never all 65536 ports: port 0 is in none).
func (r PortRange) count() uint16 {
	if r.Min > r.Max {
		return 0
	}
	return r.Max - r.Min + 1
}

// localPortRangeFile is read in the calling thread's network namespace: the sysctl is per
// namespace.
const localPortRangeFile = "/proc/sys/net/ipv4/ip_local_port_range"

// ReadLocalPortRange reads net.ipv4.ip_local_port_range, the ports this network
// namespace's sockets are given by connect() and bind() to port 0.
func ReadLocalPortRange() (PortRange, error) {
	b, err := os.ReadFile(localPortRangeFile)
	if err != nil {
		return PortRange{}, fmt.Errorf("read the node's ephemeral port range: %w", err)
	}
	return parseLocalPortRange(string(b))
}

func parseLocalPortRange(s string) (PortRange, error) {
	f := strings.Fields(s)
	if len(f) != 2 {
		return PortRange{}, fmt.Errorf("%s holds %q, want two ports", localPortRangeFile, s)
	}
	lo, err1 := strconv.ParseUint(f[0], 10, 16)
	hi, err2 := strconv.ParseUint(f[1], 10, 16)
	if err1 != nil || err2 != nil || lo == 0 || lo > hi {
		return PortRange{}, fmt.Errorf("%s holds %q, want two ports, low first", localPortRangeFile, s)
	}
	return PortRange{Min: uint16(lo), Max: uint16(hi)}, nil
}

// MinSNATPorts is the fewest ports masquerade and NodePort SNAT may be left with once the
// node's ephemeral ports are taken out: every destination (peer address and port) can then
// hold that many translated flows at once.
const MinSNATPorts = 1024

// KeepOutOf makes translated flows keep out of r, the node's ephemeral range, when that
// leaves them MinSNATPorts or more; otherwise it sets an empty window and returns false:
// on a node whose own connections may take almost any port (ip_local_port_range 1024-65535,
// as some proxies tune it) translated flows are let share the range, and a connection of the
// node's can then meet one (the caller warns), rather than the agent not starting.
func (c *Config) KeepOutOf(r PortRange) bool {
	d := *c
	d.setDefaults()
	d.LocalPortRange = r
	if _, err := d.snatSkip(); err != nil {
		c.LocalPortRange = noPorts()
		return false
	}
	c.LocalPortRange = r
	return true
}

// snatSkip is the part of the node's ephemeral range inside the SNAT range: the window
// port claims leave out (bpf/lib/portclaim.h). An error when too little would be left.
func (c *Config) snatSkip() (PortRange, error) {
	snat := PortRange{Min: c.SNATPortMin, Max: uint16(int(c.SNATPortMin) + int(c.SNATPortCount) - 1)}
	skip := PortRange{Min: max(snat.Min, c.LocalPortRange.Min), Max: min(snat.Max, c.LocalPortRange.Max)}
	if skip.count() == 0 {
		return noPorts(), nil
	}
	if left := int(snat.count()) - int(skip.count()); left < MinSNATPorts {
		return PortRange{}, fmt.Errorf("masquerade and NodePort SNAT would have %d ports: their range %s is almost all inside the node's ephemeral range %s (net.ipv4.ip_local_port_range), which translated flows keep out of; set masquerade.portMin so that the range reaches outside it, or narrow ip_local_port_range, so that %d ports or more are left",
			left, snat, c.LocalPortRange, MinSNATPorts)
	}
	return skip, nil
}
