package e2e

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/lbmap"
)

// The first layout's reverse-NAT index (tern_revnat), which its reply path needs: per
// backend (address, port, protocol) the frontends it serves.
type v1RevNATKey struct {
	Addr  uint32
	Port  uint16
	Proto uint8
	Pad   uint8
}

type v1RevNATValue struct {
	Count     uint32
	Frontends [8]struct {
		Addr uint32
		Port uint16
		Pad  uint16
	}
}

// v1Node is the first datapath layout (loader/testdata/v1) loaded and attached the way its
// agent did: maps pinned by name under the pin root, tcx links pinned under links/, or
// clsact filters at handle 1, priority 1.
type v1Node struct {
	coll *ebpf.Collection
}

func startV1(t *testing.T, lab *nodeLab, root string, clsact bool) *v1Node {
	t.Helper()
	spec, err := ebpf.LoadCollectionSpec("../../loader/testdata/v1/pod_bpfel.o")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		t.Fatal(err)
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: root}})
	if err != nil {
		t.Fatalf("load the first-layout object: %v", err)
	}
	t.Cleanup(coll.Close)
	from, to := coll.Programs["tern_from_pod"], coll.Programs["tern_to_pod"]
	err = nsutil.Do(lab.node, func() error {
		for _, p := range lab.pods {
			if clsact {
				if err := netlink.QdiscReplace(&netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: p.ifindex,
					Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}); err != nil {
					return err
				}
				for _, a := range []struct {
					parent uint32
					prog   *ebpf.Program
					name   string
				}{{netlink.HANDLE_MIN_INGRESS, from, "tern_from_pod"}, {netlink.HANDLE_MIN_EGRESS, to, "tern_to_pod"}} {
					if err := netlink.FilterReplace(&netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: p.ifindex,
						Parent: a.parent, Handle: 1, Priority: 1, Protocol: unix.ETH_P_ALL},
						Fd: a.prog.FD(), Name: a.name, DirectAction: true}); err != nil {
						return err
					}
				}
				continue
			}
			for _, a := range []struct {
				dir  string
				prog *ebpf.Program
				at   ebpf.AttachType
			}{{"ingress", from, ebpf.AttachTCXIngress}, {"egress", to, ebpf.AttachTCXEgress}} {
				l, err := link.AttachTCX(link.TCXOptions{Interface: p.ifindex, Program: a.prog, Attach: a.at})
				if err != nil {
					return fmt.Errorf("attach first-layout %s program with tcx: %w", a.dir, err)
				}
				pin := filepath.Join(root, "links", fmt.Sprintf("if%d_%s", p.ifindex, a.dir))
				if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
					return err
				}
				err = l.Pin(pin)
				l.Close()
				if err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return &v1Node{coll: coll}
}

// program writes a frontend into the first layout's maps as its reconciler did: slots,
// reverse-NAT index, then the frontend.
func (v *v1Node) program(t *testing.T, id uint32, f service.Frontend, backends ...service.Backend) {
	t.Helper()
	for i, b := range backends {
		be := loader.BackendValue{Addr: loader.AddrToBE(b.Addr), Port: loader.PortToBE(b.Port)}
		if err := v.coll.Maps["tern_backends"].Put(loader.BackendKey{SvcId: id, Slot: uint32(i + 1)}, be); err != nil {
			t.Fatal(err)
		}
		rk := v1RevNATKey{Addr: be.Addr, Port: be.Port, Proto: uint8(f.Proto)}
		var rv v1RevNATValue
		if err := v.coll.Maps["tern_revnat"].Lookup(rk, &rv); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Fatal(err)
		}
		rv.Frontends[rv.Count].Addr = loader.AddrToBE(f.Addr)
		rv.Frontends[rv.Count].Port = loader.PortToBE(f.Port)
		rv.Count++
		if err := v.coll.Maps["tern_revnat"].Put(rk, rv); err != nil {
			t.Fatal(err)
		}
	}
	k := loader.ServiceKey{Addr: loader.AddrToBE(f.Addr), Port: loader.PortToBE(f.Port), Proto: uint8(f.Proto)}
	if err := v.coll.Maps["tern_services"].Put(k, loader.ServiceValue{Id: id, BackendCount: uint16(len(backends))}); err != nil {
		t.Fatal(err)
	}
}

// udpSession is one client socket that keeps asking the same frontend.
type udpSession struct {
	c       *net.UDPConn
	backend string
}

func (p *podNS) openUDP(t *testing.T, addr string) *net.UDPConn {
	t.Helper()
	var c net.Conn
	err := nsutil.Do(p.ns, func() (err error) {
		c, err = net.Dial("udp4", addr)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.UDPConn)
}

// ask sends one datagram and waits for one answer: no retry, a lost datagram fails.
func ask(c *net.UDPConn) (string, netip.AddrPort, error) {
	if _, err := c.Write([]byte("who")); err != nil {
		return "", netip.AddrPort{}, err
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 1500)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		return "", netip.AddrPort{}, err
	}
	return string(buf[:n]), from, nil
}

func localPort(a net.Addr) uint16 {
	return uint16(a.(interface{ AddrPort() netip.AddrPort }).AddrPort().Port())
}

// TestUpgradeFromFirstLayout runs the first datapath layout under live TCP and UDP flows
// through a ClusterIP, then the current loader, reconciler and re-attach on the same pin
// root and interfaces, as an upgraded agent does. Every established flow keeps its backend
// (a re-balanced TCP flow would reach a backend without its socket and be reset; a UDP
// socket would hear another backend's name), a background flow never misses an answer,
// new flows work, and the old layout's pins are gone.
func TestUpgradeFromFirstLayout(t *testing.T) {
	for _, mode := range []struct {
		name   string
		clsact bool
	}{{"tcx", false}, {"clsact", true}} {
		t.Run(mode.name, func(t *testing.T) { testUpgrade(t, mode.clsact) })
	}
}

func testUpgrade(t *testing.T, clsact bool) {
	lab := newNodeLab(t)
	client := lab.addPod("client", "10.0.1.10")
	b1 := lab.addPod("b1", "10.0.1.21")
	b2 := lab.addPod("b2", "10.0.1.22")
	for _, p := range []*podNS{client, b1, b2} {
		p.serve(t, 8080)
	}
	byName := map[string]netip.Addr{"b1": b1.ip, "b2": b2.ip, "client": client.ip}

	root := loadertest.PinRoot(t)
	old := startV1(t, lab, root, clsact)
	web := service.Frontend{Addr: vip, Port: 80, Proto: service.TCP}
	webUDP := service.Frontend{Addr: vip, Port: 80, Proto: service.UDP}
	self := service.Frontend{Addr: vip, Port: 81, Proto: service.TCP}
	both := []service.Backend{{Addr: b1.ip, Port: 8080}, {Addr: b2.ip, Port: 8080}}
	me := []service.Backend{{Addr: client.ip, Port: 8080}}
	old.program(t, 1, web, both...)
	old.program(t, 2, webUDP, both...)
	old.program(t, 3, self, me...)

	// Long-lived flows through the old datapath: with two backends, eight TCP connections
	// and eight UDP sockets that kept their backend by chance after a re-balance would be
	// 1 in 2^16.
	type tcpFlow struct {
		c       *conn
		backend string
	}
	var tcps []tcpFlow
	for i := 0; i < 8; i++ {
		c, who, err := client.dialTCP("10.96.0.10:80")
		if err != nil {
			t.Fatalf("connection %d through the first layout: %v", i, err)
		}
		t.Cleanup(func() { c.c.Close() })
		tcps = append(tcps, tcpFlow{c, who})
	}
	var udps []udpSession
	for i := 0; i < 8; i++ {
		c := client.openUDP(t, "10.96.0.10:80")
		who, from, err := ask(c)
		if err != nil || from != netip.AddrPortFrom(vip, 80) {
			t.Fatalf("UDP socket %d through the first layout: %v (answer from %s)", i, err, from)
		}
		udps = append(udps, udpSession{c, who})
	}
	hp, who, err := client.dialTCP("10.96.0.10:81")
	if err != nil || who != "client" {
		t.Fatalf("hairpin through the first layout: %v (answered by %q)", err, who)
	}
	t.Cleanup(func() { hp.c.Close() })
	tcps = append(tcps, tcpFlow{hp, "client"})
	t.Logf("first layout: %d TCP flows (one hairpin) and %d UDP sockets established", len(tcps), len(udps))

	// Live traffic across the whole upgrade: one TCP flow echoes and one UDP socket asks,
	// paced, until stopped; any failure fails the test.
	bgTCP, bgUDP := tcps[0], udps[0]
	tcps, udps = tcps[1:], udps[1:]
	stop := make(chan struct{})
	var (
		wg     sync.WaitGroup
		bgErr  error
		rounds int
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if err := bgTCP.c.echo(fmt.Sprintf("round %d", rounds)); err != nil {
				bgErr = fmt.Errorf("background TCP flow, round %d: %w", rounds, err)
				return
			}
			got, from, err := ask(bgUDP.c)
			if err != nil || got != bgUDP.backend || from != netip.AddrPortFrom(vip, 80) {
				bgErr = fmt.Errorf("background UDP socket, round %d: answer %q from %s (%v), want %q from the VIP",
					rounds, got, from, err, bgUDP.backend)
				return
			}
			rounds++
		}
	}()
	stopBG := func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}
	t.Cleanup(stopBG)

	// The new agent: load on the same pin root (the old programs stay attached and keep
	// forwarding), take over the service maps, convert conntrack.
	d := loadertest.New(t, loader.Config{PinRoot: root, ForceClsact: clsact})
	r, err := lbmap.NewReconciler(d.Maps(), nil)
	if err != nil {
		t.Fatal(err)
	}
	desired := service.State{web: both, webUDP: both, self: me}
	if err := r.Sync(desired); err != nil {
		t.Fatal(err)
	}
	if st := d.LastMigration(); st.Converted < 1+len(tcps)+len(udps) {
		t.Fatalf("Load converted %+v first-layout flows, want at least %d", st, 1+len(tcps)+len(udps))
	}
	ct, err := d.Maps().DumpCT()
	if err != nil {
		t.Fatal(err)
	}
	check := func(what string, proto service.Protocol, sport, vport uint16, backend string) {
		t.Helper()
		k := loader.CTFlowKey(client.ip, sport, vip, vport, uint8(proto))
		v, ok := ct[k]
		if !ok || v.NatAddr != loader.AddrToBE(byName[backend]) {
			t.Fatalf("%s from port %d: converted entry %+v (present %v), want its backend %s", what, sport, v, ok, backend)
		}
	}
	for _, f := range tcps {
		check("TCP flow", service.TCP, localPort(f.c.c.LocalAddr()), uint16(map[bool]int{true: 81, false: 80}[f.backend == "client"]), f.backend)
	}
	for _, u := range udps {
		check("UDP socket", service.UDP, localPort(u.c.LocalAddr()), 80, u.backend)
	}

	// A flow the old programs open after Load: FinishUpgrade's second pass must carry it.
	late, lateWho, err := client.dialTCP("10.96.0.10:80")
	if err != nil {
		t.Fatalf("connection through the first layout after the new Load: %v", err)
	}
	t.Cleanup(func() { late.c.Close() })
	tcps = append(tcps, tcpFlow{late, lateWho})

	// Swap: every pod's hooks get the new programs in place, then the upgrade completes.
	var swapped []int
	if err := nsutil.Do(lab.node, func() (err error) {
		swapped, err = d.ReattachPods()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var want []int
	for _, p := range lab.pods {
		want = append(want, p.ifindex)
	}
	slices.Sort(want)
	slices.Sort(swapped)
	if !slices.Equal(swapped, want) {
		t.Fatalf("re-attached interfaces %v, want every pod's %v", swapped, want)
	}
	if err := d.FinishUpgrade(); err != nil {
		t.Fatal(err)
	}
	requireNewPrograms(t, lab, d, root, clsact)
	if ct, err = d.Maps().DumpCT(); err != nil {
		t.Fatal(err)
	}
	check("TCP flow opened after Load", service.TCP, localPort(late.c.LocalAddr()), 80, lateWho)

	// Established flows kept their backends, data both ways.
	for i, f := range tcps {
		if err := f.c.echo("after the upgrade"); err != nil {
			t.Fatalf("TCP flow %d to %s broke across the upgrade: %v", i, f.backend, err)
		}
	}
	for i, u := range udps {
		got, from, err := ask(u.c)
		if err != nil || got != u.backend || from != netip.AddrPortFrom(vip, 80) {
			t.Fatalf("UDP socket %d after the upgrade: answer %q from %s (%v), want %q from the VIP", i, got, from, err, u.backend)
		}
	}
	stopBG()
	if bgErr != nil {
		t.Fatal(bgErr)
	}
	if rounds == 0 {
		t.Fatal("the background flows never ran")
	}
	t.Logf("after the swap: %d TCP flows echoed, %d UDP sockets answered by the same backend from the VIP; background flows ran %d rounds without a miss",
		len(tcps), len(udps), rounds)

	// New flows work on the new layout.
	seen := map[string]int{}
	for i := 0; i < 10; i++ {
		c, who, err := client.dialTCP("10.96.0.10:80")
		if err != nil {
			t.Fatalf("new connection %d after the upgrade: %v", i, err)
		}
		if err := c.echo("new"); err != nil {
			t.Fatal(err)
		}
		c.c.Close()
		seen[who]++
	}
	nu := client.openUDP(t, "10.96.0.10:80")
	if got, from, err := ask(nu); err != nil || from != netip.AddrPortFrom(vip, 80) || (got != "b1" && got != "b2") {
		t.Fatalf("new UDP socket after the upgrade: %q from %s (%v)", got, from, err)
	}
	if c, who, err := client.dialTCP("10.96.0.10:81"); err != nil || who != "client" {
		t.Fatalf("new hairpin connection after the upgrade: %v (answered by %q)", err, who)
	} else {
		c.c.Close()
	}
	t.Logf("new flows after the upgrade: TCP %v, UDP and hairpin answered", seen)

	for _, name := range []string{"tern_ct", "tern_revnat"} {
		if _, err := os.Stat(filepath.Join(root, name)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("first-layout pin %s still there after the upgrade (%v)", name, err)
		}
	}
	es, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if strings.Contains(e.Name(), "_old_") {
			t.Fatalf("moved-aside pin %s left after the upgrade", e.Name())
		}
	}
}

// requireNewPrograms checks that every pod hook runs the new programs, so the flows above
// were carried by them and not by the old ones still attached.
func requireNewPrograms(t *testing.T, lab *nodeLab, d *loader.Datapath, root string, clsact bool) {
	t.Helper()
	id := func(p *ebpf.Program) ebpf.ProgramID {
		info, err := p.Info()
		if err != nil {
			t.Fatal(err)
		}
		pid, _ := info.ID()
		return pid
	}
	wantIn, wantOut := id(d.FromPod()), id(d.ToPod())
	err := nsutil.Do(lab.node, func() error {
		for _, p := range lab.pods {
			if clsact {
				for parent, want := range map[uint32]ebpf.ProgramID{netlink.HANDLE_MIN_INGRESS: wantIn, netlink.HANDLE_MIN_EGRESS: wantOut} {
					fs, err := netlink.FilterList(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: p.ifindex}}, parent)
					if err != nil {
						return err
					}
					if len(fs) != 1 || fs[0].(*netlink.BpfFilter).Id != int(want) {
						return fmt.Errorf("%s: clsact filters %+v, want one running program %d", p.hostIf, fs, want)
					}
				}
				continue
			}
			for dir, want := range map[string]ebpf.ProgramID{"ingress": wantIn, "egress": wantOut} {
				l, err := link.LoadPinnedLink(filepath.Join(root, "links", fmt.Sprintf("if%d_%s", p.ifindex, dir)), nil)
				if err != nil {
					return err
				}
				info, err := l.Info()
				l.Close()
				if err != nil {
					return err
				}
				if info.Program != want {
					return fmt.Errorf("%s %s: tcx link runs program %d, want the new %d", p.hostIf, dir, info.Program, want)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
