//go:build linux

package kube_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/policy/policytest"
	"github.com/tern-net/tern/test/lab"
)

// probeTimeout bounds one policy probe. Why a timeout can tell denied from allowed here:
//   - a denied flow's first packet (TCP SYN, UDP datagram, SCTP INIT) is dropped by the
//     datapath (TC_ACT_SHOT), so the prober never hears anything: no RST, no ICMP;
//   - an allowed probe crosses two veths and a node link on this host: its answer comes back
//     within milliseconds (the random test logs the slowest), so 500 ms is a wide margin;
//   - the clock starts once the first packet is sent, and at the bound the probe looks at
//     the kernel's state without waiting (connected? an answer in the receive buffer?), so a
//     prober starved of CPU reads a late answer as allowed, never as denied;
//   - a denied TCP probe sends one SYN (TCP_USER_TIMEOUT gives up at the 1 s retransmission
//     instead of resending), a denied UDP or SCTP probe one datagram: every denied probe is
//     exactly one drop_policy count on one node. The callers check that the drop counters
//     rose by exactly the number of unanswered probes: a probe that went unanswered without
//     a policy drop (lost) fails the test instead of passing as "denied";
//   - any other answer (RST, ICMP unreachable, a wrong echo) is an error, not a verdict.
const probeTimeout = 500 * time.Millisecond

// labServices are what every pod of the random lab scenarios serves: two ports per
// protocol, one of them shared across protocols (TCP/UDP/SCTP on one number are separate).
var labServices = []policytest.Service{
	{Protocol: "TCP", Port: 80}, {Protocol: "TCP", Port: 8080},
	{Protocol: "UDP", Port: 53}, {Protocol: "UDP", Port: 8080},
	{Protocol: "SCTP", Port: 9000}, {Protocol: "SCTP", Port: 80},
}

// serveServices starts p's servers for svcs: TCP greeters (lab.Pod.Serve), UDP echoes and
// one SCTP responder for all SCTP ports. The returned func stops the UDP and SCTP ones
// (the TCP ones stop with the pod).
//
// echoes, when not nil, gets p's UDP echo servers by address, for probeVia.
func serveServices(p *lab.Pod, svcs []policytest.Service, echoes map[netip.AddrPort]*udpEcho) (func(), error) {
	var stops []func()
	stop := func() {
		for _, s := range stops {
			s()
		}
	}
	var sctpPorts []uint16
	for _, s := range svcs {
		switch s.Protocol {
		case "TCP":
			if _, err := p.Serve(int(s.Port)); err != nil {
				stop()
				return nil, err
			}
		case "UDP":
			e, err := newUDPEcho(p, int(s.Port))
			if err != nil {
				stop()
				return nil, err
			}
			stops = append(stops, e.close)
			if echoes != nil {
				echoes[netip.AddrPortFrom(p.IP, s.Port)] = e
			}
		case "SCTP":
			sctpPorts = append(sctpPorts, s.Port)
		}
	}
	if len(sctpPorts) > 0 {
		st, err := serveSCTP(p, sctpPorts)
		if err != nil {
			stop()
			return nil, err
		}
		stops = append(stops, st)
	}
	return stop, nil
}

// probe opens one flow from p to dst (proto, port) with source port src, and tells whether
// the service answered within probeTimeout. Each probe must use a source port no earlier
// probe used towards the same destination: an allowed flow's verdict is cached in its
// conntrack entry, so a reused UDP or SCTP tuple would be judged as established.
func probe(ctx context.Context, p *lab.Pod, dst netip.Addr, proto string, port, src uint16) (bool, error) {
	return probeVia(ctx, p, dst, proto, port, src, nil)
}

// probeVia is probe; a UDP probe to one of echoes' servers that saw no answer in time asks
// the server whether the request reached it (see udpEcho) before it decides.
func probeVia(ctx context.Context, p *lab.Pod, dst netip.Addr, proto string, port, src uint16, echoes map[netip.AddrPort]*udpEcho) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	switch proto {
	case "TCP":
		return probeTCP(ctx, p, netip.AddrPortFrom(dst, port), src)
	case "UDP":
		return probeUDP(ctx, p, netip.AddrPortFrom(dst, port), src, echoes[netip.AddrPortFrom(dst, port)])
	case "SCTP":
		return probeSCTP(ctx, p, netip.AddrPortFrom(dst, port), src)
	}
	return false, fmt.Errorf("probe: unknown protocol %q", proto)
}

func timedOut(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded)
}

// Every probe decides by the kernel's state, not by how soon this process looked: its
// clock starts when the first packet has been sent, and when the bound is reached it checks
// once, without blocking, whether the answer is there (a connected socket, a datagram in
// the receive buffer). A prober starved of CPU on this shared machine then sees a late
// allowed answer as allowed, never as denied; a denied flow has no answer to find.

// waitReady waits until fd is ready for events or the deadline passes, and then looks
// once more without waiting.
func waitReady(fd int, events int16, deadline time.Time) error {
	for {
		ms := int(time.Until(deadline).Milliseconds())
		if ms < 0 {
			ms = 0
		}
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: events}}, ms)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || n > 0 || ms == 0 {
			return err
		}
	}
}

func probeTCP(ctx context.Context, p *lab.Pod, dst netip.AddrPort, src uint16) (bool, error) {
	var fd int
	err := p.Exec(func() error {
		var err error
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		// Give up at the first SYN retransmission (1 s) instead of resending: a denied
		// probe is exactly one dropped SYN even if this process closes the socket late.
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(probeTimeout.Milliseconds()))
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: int(src)}); err != nil {
			unix.Close(fd)
			return err
		}
		if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}); err != nil && !errors.Is(err, unix.EINPROGRESS) {
			unix.Close(fd)
			return err
		}
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("tcp %s -> %s from port %d: %w", p.Key(), dst, src, err)
	}
	defer unix.Close(fd)
	if err := waitReady(fd, unix.POLLOUT, time.Now().Add(probeTimeout)); err != nil {
		return false, fmt.Errorf("tcp %s -> %s: poll: %w", p.Key(), dst, err)
	}
	if soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || soerr != 0 {
		return false, fmt.Errorf("tcp %s -> %s: connect failed: %v %v (a RST or an ICMP error is not a policy verdict)", p.Key(), dst, unix.Errno(soerr), err)
	}
	if _, err := unix.Getpeername(fd); err != nil {
		if errors.Is(err, unix.ENOTCONN) {
			return false, nil // still SYN_SENT: no SYN-ACK came back
		}
		return false, fmt.Errorf("tcp %s -> %s: %w", p.Key(), dst, err)
	}
	return true, nil
}

// With echo (the server's record) a probe that saw no answer within probeTimeout waits until
// the server has answered everything the kernel delivered to it: if the server never got the
// request, the probe saw no answer (denied, or lost: the callers' drop count tells); if it
// answered at T, the probe looks for the echo until T + probeTimeout, so a server this
// process's scheduler ran late is not read as a drop, and an echo that was sent and then
// lost on the way back still is.
func probeUDP(ctx context.Context, p *lab.Pod, dst netip.AddrPort, src uint16, echo *udpEcho) (bool, error) {
	var fd int
	msg := []byte(fmt.Sprintf("probe %d", src))
	err := p.Exec(func() error {
		var err error
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: int(src)}); err != nil {
			unix.Close(fd)
			return err
		}
		if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}); err != nil {
			unix.Close(fd)
			return err
		}
		if _, err := unix.Write(fd, msg); err != nil {
			unix.Close(fd)
			return err
		}
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("udp %s -> %s from port %d: %w", p.Key(), dst, src, err)
	}
	defer unix.Close(fd)
	if err := waitReady(fd, unix.POLLIN, time.Now().Add(probeTimeout)); err != nil {
		return false, fmt.Errorf("udp %s -> %s: poll: %w", p.Key(), dst, err)
	}
	buf := make([]byte, 64)
	n, err := unix.Read(fd, buf)
	if errors.Is(err, unix.EAGAIN) && echo != nil {
		at, answered, aerr := echo.answeredAt(netip.AddrPortFrom(p.IP, src), 10*time.Second)
		if aerr != nil {
			return false, fmt.Errorf("udp %s -> %s: %w", p.Key(), dst, aerr)
		}
		if !answered {
			return false, nil
		}
		if err := waitReady(fd, unix.POLLIN, at.Add(probeTimeout)); err != nil {
			return false, fmt.Errorf("udp %s -> %s: poll: %w", p.Key(), dst, err)
		}
		n, err = unix.Read(fd, buf)
		if errors.Is(err, unix.EAGAIN) {
			return false, fmt.Errorf("udp %s -> %s: the server answered at %s but no echo arrived within %s of it: lost on the way back",
				p.Key(), dst, at.Format("15:04:05.000"), probeTimeout)
		}
	}
	if errors.Is(err, unix.EAGAIN) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("udp %s -> %s: %w (an ICMP error is not a policy verdict)", p.Key(), dst, err)
	}
	if string(buf[:n]) != string(msg) {
		return false, fmt.Errorf("udp %s -> %s: echo %q, want %q", p.Key(), dst, buf[:n], msg)
	}
	return true, nil
}

// SCTP without the kernel's SCTP stack: this kernel has no CONFIG_IP_SCTP (and no module
// loading), so the probes speak the first two packets of an SCTP association over raw IP
// sockets (protocol 132): the client sends INIT, the responder answers INIT ACK. That is
// all a NetworkPolicy verdict depends on (the datapath judges the first packet and passes
// the reply through conntrack), and the packets are real SCTP on the wire: common header,
// CRC32c, the INIT and INIT ACK chunks of RFC 9260.
const (
	ipProtoSCTP     = 132
	sctpChunkInit   = 1
	sctpChunkInitAk = 2
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// sctpPacket builds a common header with one chunk; the checksum is CRC32c over the whole
// packet with the checksum field zero, stored little-endian as Linux does.
func sctpPacket(sport, dport uint16, vtag uint32, chunkType uint8, initTag uint32, cookie bool) []byte {
	clen := 20
	if cookie {
		clen += 8 // a State Cookie parameter (mandatory in INIT ACK) with 4 bytes of cookie
	}
	b := make([]byte, 12+clen)
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint32(b[4:], vtag)
	c := b[12:]
	c[0] = chunkType
	binary.BigEndian.PutUint16(c[2:], uint16(clen))
	binary.BigEndian.PutUint32(c[4:], initTag)
	binary.BigEndian.PutUint32(c[8:], 65536) // a_rwnd
	binary.BigEndian.PutUint16(c[12:], 1)    // outbound streams
	binary.BigEndian.PutUint16(c[14:], 1)    // inbound streams
	binary.BigEndian.PutUint32(c[16:], initTag)
	if cookie {
		binary.BigEndian.PutUint16(c[20:], 7)
		binary.BigEndian.PutUint16(c[22:], 8)
		binary.BigEndian.PutUint32(c[24:], initTag^0x5a5a5a5a)
	}
	binary.LittleEndian.PutUint32(b[8:], crc32.Checksum(b, castagnoli))
	return b
}

type sctpHeader struct {
	sport, dport uint16
	vtag         uint32
	chunk        uint8
	initTag      uint32
}

func parseSCTP(b []byte) (sctpHeader, bool) {
	if len(b) < 12+20 {
		return sctpHeader{}, false
	}
	return sctpHeader{sport: binary.BigEndian.Uint16(b[0:]), dport: binary.BigEndian.Uint16(b[2:]),
		vtag: binary.BigEndian.Uint32(b[4:]), chunk: b[12], initTag: binary.BigEndian.Uint32(b[16:])}, true
}

// rawSCTP opens a raw IPv4 socket for protocol 132 in p (reads return the SCTP packet
// without the IP header).
func rawSCTP(p *lab.Pod) (*net.IPConn, error) {
	var c *net.IPConn
	err := p.Exec(func() error {
		var err error
		c, err = net.ListenIP(fmt.Sprintf("ip4:%d", ipProtoSCTP), &net.IPAddr{IP: p.IP.AsSlice()})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("raw SCTP socket in %s: %w", p.Key(), err)
	}
	return c, nil
}

// serveSCTP answers every INIT to one of ports with an INIT ACK.
func serveSCTP(p *lab.Pod, ports []uint16) (func(), error) {
	c, err := rawSCTP(p)
	if err != nil {
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			h, ok := parseSCTP(buf[:n])
			if !ok || h.chunk != sctpChunkInit || h.vtag != 0 || !slices.Contains(ports, h.dport) {
				continue
			}
			_, _ = c.WriteTo(sctpPacket(h.dport, h.sport, h.initTag, sctpChunkInitAk, h.initTag^0xffffffff, true), from)
		}
	}()
	return func() { c.Close(); <-done }, nil
}

func probeSCTP(ctx context.Context, p *lab.Pod, dst netip.AddrPort, src uint16) (bool, error) {
	var fd int
	tag := uint32(src)<<16 | uint32(dst.Port()) | 1
	err := p.Exec(func() error {
		var err error
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, ipProtoSCTP); err != nil {
			return err
		}
		if err := unix.Sendto(fd, sctpPacket(src, dst.Port(), 0, sctpChunkInit, tag, false), 0,
			&unix.SockaddrInet4{Addr: dst.Addr().As4()}); err != nil {
			unix.Close(fd)
			return err
		}
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("sctp %s -> %s: send INIT: %w", p.Key(), dst, err)
	}
	defer unix.Close(fd)
	deadline := time.Now().Add(probeTimeout)
	buf := make([]byte, 1500)
	for {
		if err := waitReady(fd, unix.POLLIN, deadline); err != nil {
			return false, fmt.Errorf("sctp %s -> %s: poll: %w", p.Key(), dst, err)
		}
		// Drain what arrived: every raw socket of the pod sees all its SCTP packets.
		for {
			n, from, err := unix.Recvfrom(fd, buf, 0)
			if errors.Is(err, unix.EAGAIN) {
				break
			}
			if err != nil {
				return false, fmt.Errorf("sctp %s -> %s: %w", p.Key(), dst, err)
			}
			// A raw IPv4 socket reads the IP header too.
			ihl := int(buf[0]&0x0f) * 4
			if n < ihl {
				continue
			}
			h, ok := parseSCTP(buf[ihl:n])
			if !ok || h.chunk != sctpChunkInitAk || h.sport != dst.Port() || h.dport != src || h.vtag != tag {
				continue
			}
			if sa, ok := from.(*unix.SockaddrInet4); !ok || netip.AddrFrom4(sa.Addr) != dst.Addr() {
				return false, fmt.Errorf("sctp %s -> %s: INIT ACK from %v", p.Key(), dst, from)
			}
			return true, nil
		}
		if !time.Now().Before(deadline) {
			return false, nil
		}
	}
}

// sourcePorts hands out source ports no probe of the test run used before (see probe).
type sourcePorts struct {
	mu   sync.Mutex
	next uint16
}

func newSourcePorts() *sourcePorts { return &sourcePorts{next: 10000} }

func (s *sourcePorts) take() (uint16, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.next == 0 || s.next > 65000 {
		return 0, errors.New("probe source ports exhausted: fewer scenarios or probes per run")
	}
	s.next++
	return s.next - 1, nil
}
