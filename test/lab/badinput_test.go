//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/datapath"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/test/lab"
)

// inNode runs fn in the node's namespace, where the host veths and rules live.
func inNode(t *testing.T, n *lab.Node, fn func()) {
	t.Helper()
	if err := nsutil.Do(n.NS, func() error { fn(); return nil }); err != nil {
		t.Fatal(err)
	}
}

func linkExists(t *testing.T, n *lab.Node, name string) bool {
	var ok bool
	inNode(t, n, func() { _, err := netlink.LinkByName(name); ok = err == nil })
	return ok
}

func rulesOf(t *testing.T, n *lab.Node, ip netip.Addr) (r datapath.PodRules, err error) {
	inNode(t, n, func() { r, err = datapath.PodRulesOf(ip) })
	return r, err
}

func fdPath(ns netns.NsHandle) string { return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), int(ns)) }

// intact asserts that every pod keeps what ADD gave it: the agent's allocation with the
// same address, the host veth up, both policy rules and the address inside the pod (CNI
// CHECK checks all of those), and that the node holds no other allocation.
func intact(t *testing.T, l *lab.Lab, ctx context.Context, n *lab.Node, pods []*lab.Pod, after string) {
	t.Helper()
	st, err := n.Client().State(ctx)
	if err != nil {
		t.Fatalf("after %s: agent state: %v", after, err)
	}
	for _, p := range pods {
		al, ok := st.Allocations[p.Key()+"/"+p.ContainerID]
		if !ok || al.IP != p.IP.String() {
			t.Errorf("after %s: %s lost its allocation %s (agent has %+v)", after, p.Key(), p.IP, al)
		}
		if err := l.Check(ctx, p); err != nil {
			t.Errorf("after %s: CNI CHECK of %s: %v", after, p.Key(), err)
		}
	}
	if len(st.Allocations) != len(pods) {
		t.Errorf("after %s: the agent holds %d allocations for %d pods: %v", after, len(st.Allocations), len(pods), st.Allocations)
	}
	if t.Failed() {
		t.FailNow()
	}
}

// TestBadCNIInputLosesNothing runs tern-cni with every malformed or hostile input we know of,
// each answered with the CNI code and a message that names the input, and after each one the
// node's other pods still have their addresses, veths and rules.
func TestBadCNIInputLosesNothing(t *testing.T) {
	l := up(t, lab.Options{Nodes: 1, ENIConf: lab.ENIConf{MinPoolSize: 2, MaxPoolSize: 6}})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	n := l.Node(0)
	pods := addPods(t, l, ctx, 0, 3)
	intact(t, l, ctx, n, pods, "setup")

	sandbox, err := nsutil.NewAnon()
	if err != nil {
		t.Fatal(err)
	}
	defer sandbox.Close()
	plainFile := filepath.Join(t.TempDir(), "not-a-netns")
	if err := os.WriteFile(plainFile, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	conf := n.PluginConf()
	args := func(ns, name string) string {
		return "IgnoreUnknown=1;K8S_POD_NAMESPACE=" + ns + ";K8S_POD_NAME=" + name + ";K8S_POD_UID=u1"
	}
	env := func(cmd string, mod map[string]string) map[string]string {
		e := map[string]string{"CNI_COMMAND": cmd, "CNI_CONTAINERID": "badinput0123456789", "CNI_NETNS": fdPath(sandbox),
			"CNI_IFNAME": "eth0", "CNI_ARGS": args("default", "intruder")}
		for k, v := range mod {
			if v == "-" {
				delete(e, k)
			} else {
				e[k] = v
			}
		}
		return e
	}
	longName := strings.Repeat("a", 100<<10)
	cases := []struct {
		name  string
		env   map[string]string
		stdin []byte
		code  uint
		msg   string
	}{
		{"not JSON", env("ADD", nil), []byte("this is not json"), types.ErrDecodingFailure, "error unmarshall network config: invalid character"},
		{"truncated", env("ADD", nil), conf[:len(conf)/2], types.ErrDecodingFailure, "unexpected end of JSON input"},
		{"unknown version", env("ADD", nil), []byte(`{"cniVersion":"9.9.9","name":"tern","type":"tern-cni"}`), types.ErrIncompatibleCNIVersion, "9.9.9"},
		{"bad ifname", env("ADD", map[string]string{"CNI_IFNAME": "eth0/../x"}), conf, types.ErrInvalidEnvironmentVariables, "interface name contains / or : or whitespace"},
		{"too long ifname", env("ADD", map[string]string{"CNI_IFNAME": "abcdefghijklmnopq"}), conf, types.ErrInvalidEnvironmentVariables, "interface name is too long"},
		{"bad container id", env("ADD", map[string]string{"CNI_CONTAINERID": "../../x"}), conf, types.ErrInvalidEnvironmentVariables, "../../x"},
		{"missing netns", env("ADD", map[string]string{"CNI_NETNS": "-"}), conf, types.ErrInvalidEnvironmentVariables, "CNI_NETNS"},
		{"netns does not exist", env("ADD", map[string]string{"CNI_NETNS": "/proc/self/fd/987654"}), conf, types.ErrIOFailure, "/proc/self/fd/987654 (CNI_NETNS) does not exist"},
		{"netns is a plain file", env("ADD", map[string]string{"CNI_NETNS": plainFile}), conf, types.ErrIOFailure, "is not a network namespace"},
		{"no K8S args", env("ADD", map[string]string{"CNI_ARGS": "IgnoreUnknown=1"}), conf, types.ErrInvalidEnvironmentVariables, "lack K8S_POD_NAMESPACE"},
		{"name with a path", env("ADD", map[string]string{"CNI_ARGS": args("default", "../../etc")}), conf, types.ErrInvalidEnvironmentVariables, `name "../../etc" is not a DNS-1123 subdomain`},
		{"name with a shell expansion", env("ADD", map[string]string{"CNI_ARGS": args("default", "$(id)")}), conf, types.ErrInvalidEnvironmentVariables, `name "$(id)" is not a DNS-1123 subdomain`},
		{"namespace with a path", env("ADD", map[string]string{"CNI_ARGS": args("../kube-system", "web")}), conf, types.ErrInvalidEnvironmentVariables, `namespace "../kube-system" is not a DNS-1123 label`},
		{"100 KB name", env("ADD", map[string]string{"CNI_ARGS": args("default", longName)}), conf, types.ErrInvalidEnvironmentVariables, "(102400 bytes) is not a DNS-1123 subdomain"},
		{"same container ID, another pod name", env("ADD", map[string]string{"CNI_CONTAINERID": pods[0].ContainerID}), conf, types.ErrInvalidEnvironmentVariables,
			"container ID " + pods[0].ContainerID + " already holds an address for pod default/" + pods[0].Name},
		{"DEL of that container ID under the other name leaves the owner alone", env("DEL", map[string]string{"CNI_CONTAINERID": pods[0].ContainerID}), conf, 0, ""},
		{"GC without valid-attachments", env("GC", nil), conf, types.ErrInvalidNetworkConfig, "without cni.dev/valid-attachments"},
		{"GC with null valid-attachments", env("GC", nil), []byte(strings.TrimSuffix(string(conf), "}") + `,"cni.dev/valid-attachments":null}`), types.ErrInvalidNetworkConfig, "without cni.dev/valid-attachments"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := n.ExecCNI(ctx, tc.env, tc.stdin)
			if tc.code == 0 {
				if err != nil {
					t.Fatalf("want success, got %v", err)
				}
			} else {
				te, ok := lab.CNIError(err)
				if !ok {
					t.Fatalf("want CNI error %d, got %v", tc.code, err)
				}
				full := te.Msg + ": " + te.Details
				if te.Code != tc.code || !strings.Contains(full, tc.msg) {
					t.Fatalf("got code %d %q, want code %d containing %q", te.Code, full, tc.code, tc.msg)
				}
				if len(full) > 2000 {
					t.Fatalf("error message of %d bytes: it must stay readable (and bounded in Events)", len(full))
				}
			}
			intact(t, l, ctx, n, pods, tc.name)
		})
	}

	// DEL without K8S_POD_* arguments succeeds, releases the sandbox's address and removes
	// its veth and rules, and succeeds again when repeated.
	t.Run("DEL without K8S args", func(t *testing.T) {
		victim := pods[2]
		host := api.HostVethName(victim.ContainerID, "eth0")
		for i := range 2 {
			_, err := n.ExecCNI(ctx, map[string]string{"CNI_COMMAND": "DEL", "CNI_CONTAINERID": victim.ContainerID,
				"CNI_NETNS": victim.NetNSPath(), "CNI_IFNAME": "eth0"}, conf)
			if err != nil {
				t.Fatalf("DEL #%d without CNI_ARGS: %v", i+1, err)
			}
		}
		if linkExists(t, n, host) {
			t.Errorf("host veth %s of %s survived its DEL", host, victim.Key())
		}
		if r, err := rulesOf(t, n, victim.IP); err != nil || r.ToMain || r.FromTable != 0 {
			t.Errorf("rules of %s after DEL: %+v, %v", victim.IP, r, err)
		}
		l.Forget(victim)
		pods = pods[:2]
		intact(t, l, ctx, n, pods, "DEL without K8S args")
	})

	// A sandbox attached as eth1: GC finds its host veth by its route, not by the eth0 name.
	t.Run("GC of an eth1 sandbox", func(t *testing.T) {
		ns, err := nsutil.NewAnon()
		if err != nil {
			t.Fatal(err)
		}
		defer ns.Close()
		cid := "eth1sandbox0123456789"
		e := map[string]string{"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid, "CNI_NETNS": fdPath(ns), "CNI_IFNAME": "eth1",
			"CNI_ARGS": args("default", "second-if")}
		if _, err := n.ExecCNI(ctx, e, conf); err != nil {
			t.Fatalf("ADD with eth1: %v", err)
		}
		host := api.HostVethName(cid, "eth1")
		if !linkExists(t, n, host) {
			t.Fatalf("host veth %s missing after ADD", host)
		}
		if err := l.GC(ctx); err != nil { // the lab lists only its own pods as valid
			t.Fatalf("GC: %v", err)
		}
		if linkExists(t, n, host) {
			t.Errorf("GC released the eth1 sandbox but left its host veth %s", host)
		}
		st, err := n.Client().State(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for k, al := range st.Allocations {
			if strings.Contains(k, cid) {
				t.Errorf("GC left the allocation %s (%s)", k, al.IP)
			} else if r, err := rulesOf(t, n, netip.MustParseAddr(al.IP)); err != nil || !r.ToMain {
				t.Errorf("rules of %s after GC: %+v, %v", al.IP, r, err)
			}
		}
		intact(t, l, ctx, n, pods, "GC of an eth1 sandbox")
	})
}
