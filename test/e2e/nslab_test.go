package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/tern-net/tern/datapath"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
)

// nodeLab is one node namespace with pod namespaces behind veths, as a CNI would build
// them. Nothing here touches the root namespace.
type nodeLab struct {
	t    testing.TB
	node netns.NsHandle
	pods map[string]*podNS
}

type podNS struct {
	name    string
	ns      netns.NsHandle
	ip      netip.Addr
	hostIf  string
	ifindex int
	mac     net.HardwareAddr // the pod's eth0
}

func newNodeLab(t testing.TB) *nodeLab {
	testutil.RequirePrivileged(t)
	l := &nodeLab{t: t, node: testutil.NewNetNS(t), pods: map[string]*podNS{}}
	// A node always has an address of its own (its primary ENI's); ARP for pods takes its
	// source from it. Without any, the kernel falls back to broadcast frames the pods
	// ignore. This single-node lab puts it on lo.
	err := nsutil.Do(l.node, func() error {
		if err := datapath.PrepareNode(); err != nil {
			return err
		}
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return err
		}
		return netlink.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 0, 0, 2), Mask: net.CIDRMask(32, 32)}})
	})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func (l *nodeLab) addPod(name, ip string) *podNS {
	l.t.Helper()
	p := &podNS{name: name, ns: testutil.NewNetNS(l.t), ip: netip.MustParseAddr(ip), hostIf: "veth" + name}
	err := nsutil.Do(l.node, func() error {
		res, err := datapath.SetupPodLink(datapath.PodLink{HostIfName: p.hostIf, PodNS: p.ns, PodIP: p.ip})
		p.ifindex = res.HostIndex
		p.mac = res.PodMAC
		return err
	})
	if err != nil {
		l.t.Fatal(err)
	}
	l.pods[name] = p
	return p
}

func (l *nodeLab) attachAll(d *loader.Datapath) {
	l.t.Helper()
	err := nsutil.Do(l.node, func() error {
		for _, p := range l.pods {
			if _, err := d.AttachPod(p.ifindex); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		l.t.Fatal(err)
	}
}

// serve starts TCP and UDP servers on port inside the pod. TCP greets with the pod's name
// and then echoes lines; UDP answers every datagram with the pod's name.
func (p *podNS) serve(t testing.TB, port int) {
	t.Helper()
	name := func(net.Addr) string { return p.name }
	serveTCPUDP(t, p.ns, fmt.Sprintf(":%d", port), true, name)
}

// serveTCPUDP starts TCP and UDP servers on addr inside ns, stopped when the test ends.
// Each TCP connection is greeted with greet(client address) on a line, then has its lines
// echoed (echo) or is closed; each datagram is answered with greet(client address).
func serveTCPUDP(t testing.TB, ns netns.NsHandle, addr string, echo bool, greet func(client net.Addr) string) {
	t.Helper()
	var (
		tl net.Listener
		ul net.PacketConn
	)
	err := nsutil.Do(ns, func() (err error) {
		if tl, err = net.Listen("tcp4", addr); err != nil {
			return err
		}
		ul, err = net.ListenPacket("udp4", addr)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { tl.Close(); ul.Close(); wg.Wait() })
	wg.Add(2)
	go func() {
		defer wg.Done()
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				fmt.Fprintf(c, "%s\n", greet(c.RemoteAddr()))
				if echo {
					io.Copy(c, c)
				}
			}()
		}
	}()
	go func() {
		defer wg.Done()
		buf := make([]byte, 1500)
		for {
			_, from, err := ul.ReadFrom(buf)
			if err != nil {
				return
			}
			ul.WriteTo([]byte(greet(from)), from)
		}
	}()
}

// conn is a TCP connection opened from inside a pod.
type conn struct {
	c net.Conn
	r *bufio.Reader
}

// dial opens a TCP connection from inside the pod (3 s to connect).
func (p *podNS) dial(addr string) (net.Conn, error) { return p.dialFrom(0, addr) }

// dialFrom is dial from local port port (0: the kernel picks one).
func (p *podNS) dialFrom(port int, addr string) (net.Conn, error) {
	var c net.Conn
	err := nsutil.Do(p.ns, func() (err error) {
		d := net.Dialer{Timeout: 3 * time.Second}
		if port != 0 {
			d.LocalAddr = &net.TCPAddr{Port: port}
		}
		c, err = d.Dial("tcp4", addr)
		return err
	})
	return c, err
}

func (p *podNS) dialTCP(addr string) (*conn, string, error) { return p.dialTCPFrom(0, addr) }

// dialTCPFrom is dialTCP from local port port (0: the kernel picks one).
func (p *podNS) dialTCPFrom(port int, addr string) (*conn, string, error) {
	c, err := p.dialFrom(port, addr)
	if err != nil {
		return nil, "", err
	}
	cc := &conn{c: c, r: bufio.NewReader(c)}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	greet, err := cc.r.ReadString('\n')
	if err != nil {
		c.Close()
		return nil, "", fmt.Errorf("read greeting: %w", err)
	}
	return cc, strings.TrimSpace(greet), nil
}

func (c *conn) echo(msg string) error {
	c.c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c.c, "%s\n", msg); err != nil {
		return err
	}
	got, err := c.r.ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(got) != msg {
		return fmt.Errorf("echo %q came back as %q", msg, got)
	}
	return nil
}

// udpAsk sends one datagram from a connected UDP socket inside the pod and returns the
// answer and who sent it. A connected socket accepts datagrams only from the address it is
// connected to, and reports ICMP port-unreachable as ECONNREFUSED.
func (p *podNS) udpAsk(addr string) (string, netip.AddrPort, error) {
	var c *net.UDPConn
	err := nsutil.Do(p.ns, func() error {
		conn, err := net.Dial("udp4", addr)
		if err == nil {
			c = conn.(*net.UDPConn)
		}
		return err
	})
	if err != nil {
		return "", netip.AddrPort{}, err
	}
	defer c.Close()
	buf := make([]byte, 1500)
	for try := 0; try < 3; try++ {
		if _, err := c.Write([]byte("who")); err != nil {
			return "", netip.AddrPort{}, err
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return "", netip.AddrPort{}, err
		}
		return string(buf[:n]), from, nil
	}
	return "", netip.AddrPort{}, errors.New("no UDP answer after 3 tries")
}

func withTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
