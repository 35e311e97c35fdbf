//go:build linux

package lab_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/vishvananda/netlink"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/ipam/trunk"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/lab"
)

// serveWhoExternal answers every connection to port on the lab's external client with
// "external <client address>", like serveWho in a pod.
func serveWhoExternal(t *testing.T, ext *lab.External, port int) {
	t.Helper()
	testutil.ServeConns(t, ext.NS(), fmt.Sprintf(":%d", port), func(c net.Conn) {
		fmt.Fprintf(c, "external %s\n", c.RemoteAddr())
		c.Close()
	})
}

// whoEventually connects from ns to addr until it answers (a fresh path may lose its first
// packets while neighbours resolve) and checks who answered and which client address it saw.
// Only an answer ends the wait: a wrong one fails at once.
func whoEventually(t *testing.T, ctx context.Context, what string, from *lab.Pod, ext *lab.External, addr, wantWho string, wantSeen netip.Addr) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		var who, seen string
		var err error
		if from != nil {
			who, seen, err = dialWho(ctx, from.NS(), addr, time.Second)
		} else {
			who, seen, err = dialWho(ctx, ext.NS(), addr, time.Second)
		}
		if err == nil {
			ap, perr := netip.ParseAddrPort(seen)
			if perr != nil || who != wantWho || ap.Addr() != wantSeen {
				t.Fatalf("%s (%s): answered by %s seeing the client as %s, want %s seeing %s", what, addr, who, seen, wantWho, wantSeen)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s (%s): no answer in 20s: %v", what, addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestTrunkMemberPodsWithMasquerade: with masquerade on, a member pod's traffic to a host
// outside the VPC leaves with the node's address, untagged, out of the primary NIC, and the
// reply finds the pod; its traffic inside the VPC keeps the pod's own address and its VLAN
// (the emulated VPC accepts a member's address only on its VLAN). A NodePort in front of the
// member pod serves an external client from the pod's node (the reply restored to the node's
// address leaves untagged too) and from the other node (SNAT there, the member answers on its
// VLAN).
func TestTrunkMemberPodsWithMasquerade(t *testing.T) {
	o := trunkingOptions(lab.Options{Nodes: 2})
	o.AgentConfig = func(_ *lab.Node, c *agent.Config) {
		c.Masquerade.Enabled = true
		c.Masquerade.VPCCIDRs = []string{"192.168.0.0/16"} // the lab's VPC
	}
	l := upKubernetes(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	settled(t, l, ctx)
	const ns, port, extPort = "trunkmasq", 9000, 9100
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	n0, n1 := l.Node(0), l.Node(1)
	member := map[string]string{trunk.AnnotationPodENI: "true"}
	run := func(name, node string, labels map[string]string) *lab.Pod {
		p, err := l.RunPod(ctx, lab.PodSpec{Namespace: ns, Name: name, Node: node, Labels: labels, Annotations: member})
		if err != nil {
			t.Fatal(err)
		}
		checkMemberPod(t, l, ctx, p)
		serveWho(t, p, port)
		return p
	}
	m0 := run("m0", n0.Name, map[string]string{"app": "m0"})
	m1 := run("m1", n1.Name, nil)
	ext, err := l.ExternalClient()
	if err != nil {
		t.Fatal(err)
	}
	serveWhoExternal(t, ext, extPort)
	node0, node1 := netip.MustParseAddr(n0.PrimaryIP), netip.MustParseAddr(n1.PrimaryIP)

	// Outside the VPC: masqueraded to the node, and the reply comes back to the pod.
	extAddr := net.JoinHostPort(ext.IP.String(), strconv.Itoa(extPort))
	whoEventually(t, ctx, "member pod m0 to a host outside the VPC", m0, nil, extAddr, "external", node0)
	whoEventually(t, ctx, "member pod m1 to a host outside the VPC", m1, nil, extAddr, "external", node1)
	// Inside the VPC: the member's own address, on its VLAN, both ways across nodes.
	whoEventually(t, ctx, "member pod m0 to member pod m1", m0, nil, net.JoinHostPort(m1.IP.String(), strconv.Itoa(port)), "m1", m0.IP)
	whoEventually(t, ctx, "member pod m1 to member pod m0", m1, nil, net.JoinHostPort(m0.IP.String(), strconv.Itoa(port)), "m0", m1.IP)

	// A NodePort in front of m0.
	svc, err := l.Client().CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "m0"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, Selector: map[string]string{"app": "m0"},
			Ports: []corev1.ServicePort{{Port: port, TargetPort: intstr.FromInt32(port), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	np := strconv.Itoa(int(svc.Spec.Ports[0].NodePort))
	// On m0's node the backend is local: DNAT only, m0 sees the client, and its reply,
	// restored to the node's address on the trunk link, must leave untagged.
	whoEventually(t, ctx, "external client to the NodePort on m0's node", nil, ext, net.JoinHostPort(n0.PrimaryIP, np), "m0", ext.IP)
	// On the other node: DNAT + SNAT to that node, m0 answers it inside the VPC on its VLAN.
	whoEventually(t, ctx, "external client to the NodePort on the other node", nil, ext, net.JoinHostPort(n1.PrimaryIP, np), "m0", node1)

	settled(t, l, ctx)
	for _, p := range []*lab.Pod{m0, m1} {
		if err := l.DeletePod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if left := membersInCloud(l.Emulator().Snapshot()); len(left) != 0 {
		t.Fatalf("member ENIs left after DEL and GC: %v", left)
	}
	settled(t, l, ctx)
}

// TestTrunkMemberPodInItsOwnVSwitch (no Kubernetes: the runtime passes the annotations): a
// member pod whose k8s.aliyun.com/pod-networks names another vSwitch of the zone gets its
// member ENI there (an address of that vSwitch, the cloud's record says so), while a member
// pod without it stays in eni_conf's; both talk to each other and to an ENIIP pod across
// nodes both ways, though the placed pod's address is outside the trunk's vSwitch (its
// traffic still crosses the trunk, on its VLAN).
func TestTrunkMemberPodInItsOwnVSwitch(t *testing.T) {
	const memberVSwitch = "vsw-lab-members"
	memberCIDR := netip.MustParsePrefix("192.168.64.0/20")
	o := trunkingOptions(lab.Options{Nodes: 2})
	o.ExtraVSwitches = []ecsemu.VSwitchConfig{{ID: memberVSwitch, Zone: lab.Zone, CIDR: memberCIDR.String()}}
	l := up(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	settled(t, l, ctx)
	const ns = "placed"
	placed, err := l.AddPodAnnotated(ctx, 0, ns, "placed", map[string]string{trunk.AnnotationPodENI: "true",
		"k8s.aliyun.com/pod-networks": fmt.Sprintf(`{"podNetworks":[{"interface":"eth0","vSwitchOptions":[%q],"securityGroupIDs":[%q]}]}`, memberVSwitch, lab.SecurityGroup)})
	if err != nil {
		t.Fatal(err)
	}
	plain, err := l.AddPodAnnotated(ctx, 1, ns, "plain", map[string]string{trunk.AnnotationPodENI: "true"})
	if err != nil {
		t.Fatal(err)
	}
	peer, err := l.AddPod(ctx, 1, ns, "peer")
	if err != nil {
		t.Fatal(err)
	}
	if e := checkMemberPod(t, l, ctx, placed); e.VSwitchID != memberVSwitch || !memberCIDR.Contains(placed.IP) {
		t.Fatalf("placed pod %s: member %s in %s, want %s (%s)", placed.IP, e.ID, e.VSwitchID, memberVSwitch, memberCIDR)
	}
	if e := checkMemberPod(t, l, ctx, plain); e.VSwitchID != lab.PodVSwitch {
		t.Fatalf("plain member pod %s: member %s in %s, want eni_conf's %s", plain.IP, e.ID, e.VSwitchID, lab.PodVSwitch)
	}
	for _, p := range []*lab.Pod{placed, plain, peer} {
		if _, err := p.ServeHTTP(8080); err != nil {
			t.Fatal(err)
		}
	}
	httpEventually(t, ctx, placed, fmt.Sprintf("http://%s:8080/", peer.IP), "peer")
	httpEventually(t, ctx, peer, fmt.Sprintf("http://%s:8080/", placed.IP), "placed")
	httpEventually(t, ctx, placed, fmt.Sprintf("http://%s:8080/", plain.IP), "plain")
	httpEventually(t, ctx, plain, fmt.Sprintf("http://%s:8080/", placed.IP), "placed")
	settled(t, l, ctx)
	for _, p := range []*lab.Pod{placed, plain, peer} {
		if err := l.DeletePod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if left := membersInCloud(l.Emulator().Snapshot()); len(left) != 0 {
		t.Fatalf("member ENIs left after DEL and GC: %v", left)
	}
	settled(t, l, ctx)
}

// TestTrunkMemberPodsWithClsact: agents with forceClsact (the attach kernels without tcx get)
// put the trunk programs on the trunk link as clsact filters ahead of the netdev programs:
// member pods on two nodes talk to each other and to an ENIIP pod across nodes both ways (the
// VPC takes a member's address only on its VLAN, so this fails if the netdev programs ran
// first and ended the chain), and DEL + GC leave no member.
func TestTrunkMemberPodsWithClsact(t *testing.T) {
	o := trunkingOptions(lab.Options{Nodes: 2})
	o.AgentConfig = func(_ *lab.Node, c *agent.Config) { c.ForceClsact = true }
	l := up(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	settled(t, l, ctx)
	const ns = "clsact"
	member := map[string]string{trunk.AnnotationPodENI: "true"}
	m0, err := l.AddPodAnnotated(ctx, 0, ns, "m0", member)
	if err != nil {
		t.Fatal(err)
	}
	m1, err := l.AddPodAnnotated(ctx, 1, ns, "m1", member)
	if err != nil {
		t.Fatal(err)
	}
	peer, err := l.AddPod(ctx, 1, ns, "peer")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []*lab.Pod{m0, m1, peer} {
		if p != peer {
			checkMemberPod(t, l, ctx, p)
		}
		if _, err := p.ServeHTTP(8080); err != nil {
			t.Fatal(err)
		}
	}
	httpEventually(t, ctx, m0, fmt.Sprintf("http://%s:8080/", m1.IP), "m1")
	httpEventually(t, ctx, m1, fmt.Sprintf("http://%s:8080/", m0.IP), "m0")
	httpEventually(t, ctx, m0, fmt.Sprintf("http://%s:8080/", peer.IP), "peer")
	httpEventually(t, ctx, peer, fmt.Sprintf("http://%s:8080/", m0.IP), "m0")
	// The trunk link of node 0 carries the VLAN programs as clsact filters ahead of the
	// netdev programs' (and no tcx link of theirs was made).
	st, err := m0.Node.Client().State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var trunkMAC string
	for _, a := range st.Allocations {
		if a.Kind == api.KindMember {
			trunkMAC = a.ENI.MAC
		}
	}
	if err := nsutil.Do(m0.Node.NS, func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, lk := range links {
			if lk.Attrs().HardwareAddr.String() != trunkMAC {
				continue
			}
			fs, err := netlink.FilterList(lk, netlink.HANDLE_MIN_EGRESS)
			if err != nil {
				return err
			}
			prio := map[string]uint16{}
			for _, f := range fs {
				if bf, ok := f.(*netlink.BpfFilter); ok {
					prio[bf.Name] = bf.Priority
				}
			}
			if prio["tern_trunk_egress"] != loader.TrunkClsactPriority || prio[loader.NetdevProgTernToNetdev] != loader.NetdevClsactPriority {
				return fmt.Errorf("egress filters of the trunk link %s: %v, want tern_trunk_egress at %d before %s at %d", lk.Attrs().Name, prio,
					loader.TrunkClsactPriority, loader.NetdevProgTernToNetdev, loader.NetdevClsactPriority)
			}
			return nil
		}
		return fmt.Errorf("no link with the trunk's MAC %q on %s", trunkMAC, m0.Node.Name)
	}); err != nil {
		t.Fatal(err)
	}
	settled(t, l, ctx)
	for _, p := range []*lab.Pod{m0, m1, peer} {
		if err := l.DeletePod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if left := membersInCloud(l.Emulator().Snapshot()); len(left) != 0 {
		t.Fatalf("member ENIs left after DEL and GC: %v", left)
	}
	settled(t, l, ctx)
}
