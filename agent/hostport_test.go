package agent

import (
	"net/netip"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/service"
)

// A hostPort becomes one frontend per node address (hostIP empty, or 0.0.0.0) or just its
// hostIP, to podIP:containerPort with its protocol; IPv6 hostIPs are skipped as portmap
// skips the other family; bad mappings and clashes are errors naming the sandbox.
func TestHostPortState(t *testing.T) {
	node := []netip.Addr{netip.MustParseAddr("192.168.0.2"), netip.MustParseAddr("192.168.1.2")}
	pod := netip.MustParseAddr("10.0.0.5")
	fe := func(a string, p uint16, proto service.Protocol) service.Frontend {
		return service.Frontend{Addr: netip.MustParseAddr(a), Port: p, Proto: proto}
	}
	be := []service.Backend{{Addr: pod, Port: 80}}
	for _, tc := range []struct {
		name string
		pms  []api.PortMapping
		want service.State
		err  string
	}{
		{"every node address", []api.PortMapping{{HostPort: 8080, ContainerPort: 80}},
			service.State{fe("192.168.0.2", 8080, service.TCP): be, fe("192.168.1.2", 8080, service.TCP): be}, ""},
		{"0.0.0.0 is every address, udp", []api.PortMapping{{HostPort: 53, ContainerPort: 80, Protocol: "UDP", HostIP: "0.0.0.0"}},
			service.State{fe("192.168.0.2", 53, service.UDP): be, fe("192.168.1.2", 53, service.UDP): be}, ""},
		{"one hostIP", []api.PortMapping{{HostPort: 8080, ContainerPort: 80, HostIP: "192.168.1.2"}},
			service.State{fe("192.168.1.2", 8080, service.TCP): be}, ""},
		{"IPv6 hostIP skipped", []api.PortMapping{{HostPort: 8080, ContainerPort: 80, HostIP: "fd00::1"}}, service.State{}, ""},
		{"sctp refused", []api.PortMapping{{HostPort: 8080, ContainerPort: 80, Protocol: "sctp"}}, service.State{}, `protocol "sctp" is not tcp or udp`},
		{"port out of range", []api.PortMapping{{HostPort: 0, ContainerPort: 80}}, service.State{}, "ports must be 1–65535"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := hostPortState([]sandboxRecord{{ContainerID: "c1", IfName: "eth0", Pod: "ns/p", IP: pod, PortMappings: tc.pms}}, node)
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
				t.Fatalf("error %v, want %q", err, tc.err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("state %v, want %v", got, tc.want)
			}
		})
	}
	// Two sandboxes on one hostPort: an error naming both; the first keeps it.
	recs := []sandboxRecord{
		{ContainerID: "a", IfName: "eth0", IP: pod, PortMappings: []api.PortMapping{{HostPort: 8080, ContainerPort: 80}}},
		{ContainerID: "b", IfName: "eth0", IP: netip.MustParseAddr("10.0.0.6"), PortMappings: []api.PortMapping{{HostPort: 8080, ContainerPort: 80, HostIP: "192.168.0.2"}}},
	}
	got, err := hostPortState(recs, node)
	if err == nil || !strings.Contains(err.Error(), "sandbox b") || !strings.Contains(err.Error(), "taken by sandbox a") {
		t.Fatalf("clash error %v", err)
	}
	if got[fe("192.168.0.2", 8080, service.TCP)][0].Addr != pod {
		t.Fatalf("clashing frontend went to the second sandbox: %v", got)
	}
}

// The table file holds what was put and survives a reopen; a refused put leaves it as it was.
func TestSandboxTablePersists(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "sandboxes.json")
	tb, err := openSandboxTable(path)
	if err != nil {
		t.Fatal(err)
	}
	r := sandboxRecord{ContainerID: "c1", IfName: "eth0", IfIndex: 7, IP: netip.MustParseAddr("10.0.0.5"), Chained: true,
		PortMappings: []api.PortMapping{{HostPort: 8080, ContainerPort: 80}}}
	if err := tb.put(r, nil); err != nil {
		t.Fatal(err)
	}
	if err := tb.put(sandboxRecord{ContainerID: "c2", IfName: "eth0"}, func([]sandboxRecord) error { return errTest }); err != errTest {
		t.Fatalf("refused put: %v", err)
	}
	again, err := openSandboxTable(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := again.list(); len(got) != 1 || !reflect.DeepEqual(got[0], r) {
		t.Fatalf("reopened table %+v, want only %+v", got, r)
	}
	gone, err := again.remove(func(x sandboxRecord) bool { return x.ContainerID == "c1" })
	if err != nil || len(gone) != 1 {
		t.Fatalf("remove: %v %v", gone, err)
	}
	if third, _ := openSandboxTable(path); len(third.list()) != 0 {
		t.Fatalf("table after remove: %+v", third.list())
	}
}

var errTest = errString("refused by the check")

type errString string

func (e errString) Error() string { return string(e) }
