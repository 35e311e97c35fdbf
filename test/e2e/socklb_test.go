package e2e

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/sockclient"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/lbmap"
)

// newTestCgroups makes <cgroup v2 root>/tern-test-<random>/{in,out} and removes them when
// the test ends (after its client processes, whose cleanups run first). Only "in" gets
// the socket hooks.
func newTestCgroups(t testing.TB) (in, out string) {
	t.Helper()
	root, err := loader.CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	var b [6]byte
	rand.Read(b[:])
	parent := filepath.Join(root, "tern-test-"+hex.EncodeToString(b[:]))
	in, out = filepath.Join(parent, "in"), filepath.Join(parent, "out")
	for _, d := range []string{parent, in, out} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatalf("create test cgroup: %v", err)
		}
	}
	t.Cleanup(func() {
		for _, d := range []string{in, out, parent} {
			if err := os.Remove(d); err != nil {
				t.Errorf("remove test cgroup: %v", err)
			}
		}
	})
	return in, out
}

// serveSeen starts TCP and UDP servers in the pod that greet with "<pod name> <the client
// address they saw>" (TCP then closes).
func (p *podNS) serveSeen(t testing.TB, port int) {
	t.Helper()
	serveTCPUDP(t, p.ns, fmt.Sprintf(":%d", port), false, func(client net.Addr) string {
		return fmt.Sprintf("%s %s", p.name, client)
	})
}

func counters(t *testing.T, m *loader.Maps) map[loader.MetricsKey]loader.MetricsValue {
	t.Helper()
	tot, err := m.MetricsTotals()
	if err != nil {
		t.Fatal(err)
	}
	return tot
}

func delta(after, before map[loader.MetricsKey]loader.MetricsValue, r loader.Reason, d loader.Direction) uint64 {
	k := loader.MetricsKey{Reason: r, Dir: d}
	return after[k].Packets - before[k].Packets
}

func hostOf(t *testing.T, s string) netip.Addr {
	t.Helper()
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		t.Fatalf("parse address %q: %v", s, err)
	}
	return ap.Addr()
}

// TestSocketLB: processes in a cgroup with the socket hooks reach ClusterIP backends
// without the tc programs translating anything; processes outside it go through the tc
// path; connected UDP sockets on a removed backend are destroyed.
func TestSocketLB(t *testing.T) {
	lab := newNodeLab(t)
	client := lab.addPod("client", "10.0.1.10")
	b1 := lab.addPod("b1", "10.0.1.21")
	b2 := lab.addPod("b2", "10.0.1.22")
	b1.serveSeen(t, 8080)
	b2.serveSeen(t, 8080)

	d := loadertest.New(t, loader.Config{})
	lab.attachAll(d) // the tc programs are there: the counters show they translate nothing
	sock, err := d.LoadSock()
	if err != nil {
		t.Fatalf("load the sock object: %v", err)
	}
	defer sock.Close()
	st := sock.Status()
	if !st.TCP || !st.UDP || len(st.Hooks) != 8 {
		t.Fatalf("this kernel (6.x) has all eight hooks; got %+v", st)
	}
	in, out := newTestCgroups(t)
	if err := sock.Attach(in); err != nil {
		t.Fatal(err)
	}

	r, err := lbmap.NewReconciler(d.Maps(), nil)
	if err != nil {
		t.Fatal(err)
	}
	web := service.Frontend{Addr: vip, Port: 80, Proto: service.TCP}
	dns := service.Frontend{Addr: vip, Port: 53, Proto: service.UDP}
	empty := service.Frontend{Addr: emptyVIP, Port: 80, Proto: service.TCP}
	both := []service.Backend{{Addr: b1.ip, Port: 8080}, {Addr: b2.ip, Port: 8080}}
	desired := service.State{web: both, dns: both, empty: {}}
	if err := r.Apply(desired.Lookup, []service.Frontend{web, dns, empty}); err != nil {
		t.Fatal(err)
	}
	m := d.Maps()
	cin := sockclient.Start(t, client.ns, in)
	cout := sockclient.Start(t, client.ns, out)

	t.Run("tcp connect in the cgroup", func(t *testing.T) {
		before := counters(t, m)
		seen := map[string]int{}
		const n = 20
		for range n {
			a := cin.OK("tcp 10.96.0.10:80")
			if a.Peer != "10.96.0.10:80" {
				t.Fatalf("getpeername gave %s, want the VIP 10.96.0.10:80", a.Peer)
			}
			if hostOf(t, a.Seen) != client.ip || a.Seen != a.Local {
				t.Fatalf("backend %s saw the client as %s, the client's socket is %s: want the client's own address", a.Who, a.Seen, a.Local)
			}
			seen[a.Who]++
		}
		after := counters(t, m)
		if seen["b1"] == 0 || seen["b2"] == 0 {
			t.Fatalf("connections did not spread over both backends: %v", seen)
		}
		if got := delta(after, before, loader.ReasonSockConnect, loader.DirSock); got != n {
			t.Fatalf("sock_connect counted %d, want %d", got, n)
		}
		if got := delta(after, before, loader.ReasonSockRevNAT, loader.DirSock); got < n {
			t.Fatalf("sock_revnat (getpeername) counted %d, want at least %d", got, n)
		}
		for _, rsn := range []loader.Reason{loader.ReasonSvcForward, loader.ReasonSvcRevNAT, loader.ReasonSvcPortSNAT} {
			for _, dir := range []loader.Direction{loader.DirFromPod, loader.DirToPod} {
				if got := delta(after, before, rsn, dir); got != 0 {
					t.Fatalf("tc counted %d under %s/%s: the packets should already carry the backend's address", got, rsn, dir)
				}
			}
		}
		t.Logf("%d connects to 10.96.0.10:80 from the cgroup: %v; getpeername was the VIP, the backends saw %s, tc svc counters did not move", n, seen, client.ip)
	})

	t.Run("udp sendmsg recvmsg", func(t *testing.T) {
		before := counters(t, m)
		seen := map[string]int{}
		const n = 20
		for range n {
			a := cin.OK("sendto 10.96.0.10:53")
			if a.Peer != "10.96.0.10:53" {
				t.Fatalf("reply came from %s, want the VIP 10.96.0.10:53", a.Peer)
			}
			if hostOf(t, a.Seen) != client.ip {
				t.Fatalf("backend saw %s, want the client %s", a.Seen, client.ip)
			}
			seen[a.Who]++
		}
		after := counters(t, m)
		if seen["b1"] == 0 || seen["b2"] == 0 {
			t.Fatalf("datagrams did not spread: %v", seen)
		}
		if got := delta(after, before, loader.ReasonSockSendmsg, loader.DirSock); got != n {
			t.Fatalf("sock_sendmsg counted %d, want %d", got, n)
		}
		if got := delta(after, before, loader.ReasonSvcForward, loader.DirFromPod); got != 0 {
			t.Fatalf("tc translated %d datagrams", got)
		}
		t.Logf("%d unconnected datagrams to 10.96.0.10:53: %v, every reply's source was the VIP", n, seen)
	})

	t.Run("dual-stack socket, v4-mapped ClusterIP", func(t *testing.T) {
		before := counters(t, m)
		a := cin.OK("tcp6m 10.96.0.10:80")
		if a.Peer != "10.96.0.10:80" || (a.Who != "b1" && a.Who != "b2") || a.Seen != a.Local {
			t.Fatalf("IPv6 socket to ::ffff:10.96.0.10:80: %+v", a)
		}
		u := cin.OK("sendto6m 10.96.0.10:53")
		if u.Peer != "10.96.0.10:53" || (u.Who != "b1" && u.Who != "b2") {
			t.Fatalf("IPv6 UDP socket to ::ffff:10.96.0.10:53: %+v", u)
		}
		after := counters(t, m)
		if delta(after, before, loader.ReasonSockConnect, loader.DirSock) != 1 ||
			delta(after, before, loader.ReasonSockSendmsg, loader.DirSock) != 1 ||
			delta(after, before, loader.ReasonSvcForward, loader.DirFromPod) != 0 {
			t.Fatal("the v4-mapped connect and sendto were not translated by the IPv6 socket hooks alone")
		}
		t.Logf("dual-stack sockets: TCP reached %s (peer ::ffff:10.96.0.10:80), UDP %s answered from the VIP", a.Who, u.Who)
	})

	t.Run("no endpoints", func(t *testing.T) {
		a := cin.Do("tcp 10.96.0.11:80")
		if a.Errno != int(syscall.ECONNREFUSED) {
			t.Fatalf("connect to a Service without endpoints: %+v, want ECONNREFUSED", a)
		}
	})

	t.Run("outside the cgroup", func(t *testing.T) {
		before := counters(t, m)
		a := cout.OK("tcp 10.96.0.10:80")
		after := counters(t, m)
		if a.Peer != "10.96.0.10:80" || (a.Who != "b1" && a.Who != "b2") {
			t.Fatalf("outside the cgroup: %+v", a)
		}
		if got := delta(after, before, loader.ReasonSockConnect, loader.DirSock); got != 0 {
			t.Fatalf("a process outside the cgroup was translated by the socket hooks (%d)", got)
		}
		if got := delta(after, before, loader.ReasonSvcForward, loader.DirFromPod); got == 0 {
			t.Fatal("a process outside the cgroup reached the Service without the tc path translating it")
		}
		t.Logf("outside the cgroup the tc path served it (svc_forward +%d), socket hooks untouched", delta(after, before, loader.ReasonSvcForward, loader.DirFromPod))
	})

	t.Run("host-network process", func(t *testing.T) {
		host := sockclient.Start(t, lab.node, in)
		a := host.OK("tcp 10.96.0.10:80")
		if a.Peer != "10.96.0.10:80" || (a.Who != "b1" && a.Who != "b2") {
			t.Fatalf("host-network client: %+v", a)
		}
		if a.Seen != a.Local {
			t.Fatalf("backend saw %s, the node's socket is %s", a.Seen, a.Local)
		}
		u := host.OK("sendto 10.96.0.10:53")
		if u.Peer != "10.96.0.10:53" {
			t.Fatalf("host-network UDP reply from %s", u.Peer)
		}
		t.Logf("a node-namespace process in the cgroup reached %s through the ClusterIP (it saw %s) and %s over UDP", a.Who, a.Seen, u.Who)
	})

	t.Run("connected udp on a removed backend", func(t *testing.T) {
		first := cin.OK("udpconn 10.96.0.10:53")
		if first.Peer != "10.96.0.10:53" {
			t.Fatalf("connected UDP reply from %s, want the VIP", first.Peer)
		}
		gone := map[string]service.Backend{"b1": both[0], "b2": both[1]}[first.Who]
		keep := map[string]string{"b1": "b2", "b2": "b1"}[first.Who]
		desired[dns] = []service.Backend{map[string]service.Backend{"b1": both[0], "b2": both[1]}[keep]}
		if err := r.Apply(desired.Lookup, []service.Frontend{dns}); err != nil {
			t.Fatal(err)
		}
		// The problem: the socket is connected to the backend itself; nothing per packet
		// can move it, and it still reaches the removed (still running) pod.
		if a := cin.OK("udpheld"); a.Who != first.Who {
			t.Fatalf("before the destroy pass the held socket was answered by %s", a.Who)
		}
		before := counters(t, m)
		var destroyed []loader.DestroyedSocket
		err := nsutil.Do(client.ns, func() (err error) {
			destroyed, err = sock.DestroyStaleUDP()
			return err
		})
		if !st.UDPDestroy {
			// The documented fallback (Linux < 6.5): nothing is destroyed, and the socket
			// keeps its removed backend until the application reconnects. On a kernel that
			// has bpf_sock_destroy, a failed load of the iterator is a bug, not the fallback.
			if kernelAtLeast(t, 6, 5) {
				t.Fatalf("kernel has bpf_sock_destroy (6.5+) but the UDP destroy iterator did not load: %s", st.DestroyUnsupported)
			}
			if !errors.Is(err, ebpf.ErrNotSupported) {
				t.Fatalf("without bpf_sock_destroy: %v, want ErrNotSupported", err)
			}
			if a := cin.OK("udpheld"); a.Who != first.Who {
				t.Fatalf("without destroy the held socket moved to %s", a.Who)
			}
			if again := cin.OK("udpconn 10.96.0.10:53"); again.Who != keep {
				t.Fatalf("a reconnect went to %s, want %s", again.Who, keep)
			}
			t.Logf("kernel without bpf_sock_destroy (%s): the socket stayed on %s until it reconnected", st.DestroyUnsupported, first.Who)
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(destroyed) != 1 || destroyed[0].Backend != netip.AddrPortFrom(gone.Addr, gone.Port) {
			t.Fatalf("destroyed %v, want the one socket on %s", destroyed, gone.Addr)
		}
		if got := delta(counters(t, m), before, loader.ReasonSockDestroy, loader.DirSock); got != 1 {
			t.Fatalf("sock_destroy counted %d", got)
		}
		a := cin.Do("udpheld")
		if a.Errno != int(syscall.ECONNABORTED) && a.Errno != int(syscall.EDESTADDRREQ) {
			t.Fatalf("the destroyed socket answered %+v, want ECONNABORTED", a)
		}
		again := cin.OK("udpconn 10.96.0.10:53")
		if again.Who != keep || again.Peer != "10.96.0.10:53" {
			t.Fatalf("a new socket after the destroy: %+v, want %s through the VIP", again, keep)
		}
		// Nothing else was stale: a second pass destroys nothing.
		err = nsutil.Do(client.ns, func() (err error) {
			destroyed, err = sock.DestroyStaleUDP()
			return err
		})
		if err != nil || len(destroyed) != 0 {
			t.Fatalf("second pass: %v %v", destroyed, err)
		}
		t.Logf("socket on removed %s destroyed (%q), the application's new socket went to %s", first.Who, a.Err, keep)
	})

	t.Run("restart replaces programs under the same links", func(t *testing.T) {
		ids := linkProgIDs(t, d.Config().PinRoot)
		s2, err := d.LoadSock()
		if err != nil {
			t.Fatal(err)
		}
		defer s2.Close()
		if err := s2.Attach(in); err != nil {
			t.Fatal(err)
		}
		after := linkProgIDs(t, d.Config().PinRoot)
		for h, id := range ids {
			if after[h].link != id.link || after[h].prog == id.prog {
				t.Fatalf("hook %s: link %d prog %d before, link %d prog %d after: want the same link with a new program",
					h, id.link, id.prog, after[h].link, after[h].prog)
			}
		}
		if a := cin.OK("tcp 10.96.0.10:80"); a.Peer != "10.96.0.10:80" {
			t.Fatalf("after the swap: %+v", a)
		}
	})

	t.Run("detach", func(t *testing.T) {
		if err := loader.DetachSock(d.Config().PinRoot); err != nil {
			t.Fatal(err)
		}
		before := counters(t, m)
		if a := cin.OK("tcp 10.96.0.10:80"); a.Peer != "10.96.0.10:80" {
			t.Fatalf("after detach: %+v", a)
		}
		after := counters(t, m)
		if delta(after, before, loader.ReasonSockConnect, loader.DirSock) != 0 ||
			delta(after, before, loader.ReasonSvcForward, loader.DirFromPod) == 0 {
			t.Fatal("after DetachSock the cgroup's process should fall back to the tc path")
		}
	})
}

type linkProg struct{ link, prog uint32 }

func linkProgIDs(t *testing.T, root string) map[string]linkProg {
	t.Helper()
	out := map[string]linkProg{}
	for _, h := range []string{"connect4", "sendmsg4", "recvmsg4", "getpeername4", "connect6", "sendmsg6", "recvmsg6", "getpeername6"} {
		l, err := loadPinnedLinkInfo(filepath.Join(root, "links", "sock_"+h))
		if err != nil {
			t.Fatalf("hook %s: %v", h, err)
		}
		out[h] = l
	}
	return out
}

func loadPinnedLinkInfo(pin string) (linkProg, error) {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return linkProg{}, err
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return linkProg{}, err
	}
	return linkProg{link: uint32(info.ID), prog: uint32(info.Program)}, nil
}

func TestMain(m *testing.M) {
	sockclient.MaybeRun()
	os.Exit(m.Run())
}

// kernelAtLeast tells whether the running kernel is major.minor or newer.
func kernelAtLeast(t *testing.T, major, minor int) bool {
	t.Helper()
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		t.Fatalf("uname: %v", err)
	}
	var ma, mi int
	if _, err := fmt.Sscanf(unix.ByteSliceToString(uts.Release[:]), "%d.%d", &ma, &mi); err != nil {
		t.Fatalf("parse kernel release %q: %v", unix.ByteSliceToString(uts.Release[:]), err)
	}
	return ma > major || (ma == major && mi >= minor)
}
