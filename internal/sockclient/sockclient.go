// Package sockclient is a client process for socket-LB tests. The cgroup socket hooks act on
// the cgroup of the process that made the socket, so a test client must be a process of its
// own: the test binary run again with Env set (the test package's TestMain calls
// MaybeRun), started straight into a cgroup (clone3 CLONE_INTO_CGROUP) and told which
// network namespace to enter (fd 3). It reads one command per line on stdin and answers each
// with one JSON line on stdout.
package sockclient

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/nsutil"
)

// Env marks the client process.
const Env = "TERN_SOCK_CLIENT"

// MaybeRun runs the client and exits when this process is one; call it first in TestMain.
func MaybeRun() {
	if os.Getenv(Env) == "1" {
		os.Exit(clientMain())
	}
}

// Answer is one command's outcome.
type Answer struct {
	Who   string `json:"who,omitempty"`   // the backend pod that answered
	Seen  string `json:"seen,omitempty"`  // the client address the backend saw
	Peer  string `json:"peer,omitempty"`  // getpeername() of the client's socket, or a UDP reply's source
	Local string `json:"local,omitempty"` // the client socket's own address
	Err   string `json:"err,omitempty"`
	Errno int    `json:"errno,omitempty"`
	Nanos int64  `json:"nanos,omitempty"` // connloop: time taken
}

func clientMain() int {
	var held *net.UDPConn
	in := bufio.NewScanner(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		f := strings.Fields(in.Text())
		var a Answer
		err := nsutil.Do(netns.NsHandle(3), func() error {
			switch f[0] {
			case "tcp": // tcp ADDR: connect, read the greeting, report getpeername
				a = clientTCP(f[1], 3*time.Second)
			case "tcpt": // tcpt ADDR MS: as tcp, giving up after MS milliseconds
				ms, _ := strconv.Atoi(f[2])
				a = clientTCP(f[1], time.Duration(ms)*time.Millisecond)
			case "tcpfrom": // tcpfrom LOCAL ADDR MS: as tcpt, from a socket bound to LOCAL (ip:port, port 0: any)
				ms, _ := strconv.Atoi(f[3])
				a = clientTCPFrom(f[1], f[2], time.Duration(ms)*time.Millisecond)
			case "httpsget": // httpsget ADDR CAFILE PATH: GET https://ADDR/PATH, verifying with CAFILE
				a = clientHTTPSGet(f[1], f[2], f[3])
			case "sendto": // sendto ADDR: one datagram from an unconnected socket
				a = clientSendto(f[1])
			case "udpconn": // udpconn ADDR: connect a UDP socket, keep it, ask once
				if held != nil {
					held.Close()
				}
				c, err := net.Dial("udp4", f[1])
				if err != nil {
					a = errAnswer(err)
					return nil
				}
				held = c.(*net.UDPConn)
				a = askHeld(held)
			case "udpheld": // udpheld: ask again on the kept socket
				a = askHeld(held)
			case "tcp6m": // tcp6m ADDR: as tcp, from a dual-stack IPv6 socket to ::ffff:ADDR
				a = clientTCP6Mapped(f[1])
			case "sendto6m": // sendto6m ADDR: as sendto, from a dual-stack IPv6 socket
				a = clientSendto6Mapped(f[1])
			case "connloop": // connloop ADDR N: N connect()+close(), timed
				n, _ := strconv.Atoi(f[2])
				a = connLoop(f[1], n)
			default:
				a.Err = "unknown command " + f[0]
			}
			return nil
		})
		if err != nil {
			a = errAnswer(err)
		}
		if err := out.Encode(a); err != nil {
			return 1
		}
	}
	return 0
}

func errAnswer(err error) Answer {
	a := Answer{Err: err.Error()}
	var en syscall.Errno
	if errors.As(err, &en) {
		a.Errno = int(en)
	}
	return a
}

func peerOf(c syscall.Conn) string {
	rc, err := c.SyscallConn()
	if err != nil {
		return err.Error()
	}
	var peer string
	rc.Control(func(fd uintptr) {
		sa, err := unix.Getpeername(int(fd))
		if err != nil {
			peer = err.Error()
			return
		}
		if in4, ok := sa.(*unix.SockaddrInet4); ok {
			peer = netip.AddrPortFrom(netip.AddrFrom4(in4.Addr), uint16(in4.Port)).String()
		}
	})
	return peer
}

func clientTCP(addr string, timeout time.Duration) Answer {
	return clientTCPFrom("", addr, timeout)
}

// clientTCPFrom is clientTCP from a socket bound to local before connect() (when local is
// not empty), so the socket hooks see its source address and port.
func clientTCPFrom(local, addr string, timeout time.Duration) Answer {
	d := net.Dialer{Timeout: timeout}
	if local != "" {
		la, err := net.ResolveTCPAddr("tcp4", local)
		if err != nil {
			return errAnswer(err)
		}
		d.LocalAddr = la
	}
	c, err := d.Dial("tcp4", addr)
	if err != nil {
		return errAnswer(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return errAnswer(fmt.Errorf("read greeting: %w", err))
	}
	a := greeting(line)
	a.Peer = peerOf(c.(*net.TCPConn))
	a.Local = c.LocalAddr().String()
	return a
}

// clientHTTPSGet fetches https://addr/path on a new connection, checking the server's
// certificate against the CA in caFile for addr's IP. Who is the HTTP status code, Seen the
// body's first 200 bytes on one line, Peer the socket's peer.
func clientHTTPSGet(addr, caFile, path string) Answer {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return errAnswer(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return Answer{Err: "no certificate in " + caFile}
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return errAnswer(err)
	}
	d := &net.Dialer{Timeout: 3 * time.Second}
	raw, err := d.Dial("tcp4", addr)
	if err != nil {
		return errAnswer(err)
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(5 * time.Second))
	c := tls.Client(raw, &tls.Config{RootCAs: pool, ServerName: host, MinVersion: tls.VersionTLS12})
	if err := c.Handshake(); err != nil {
		return errAnswer(fmt.Errorf("TLS handshake with %s: %w", addr, err))
	}
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", path, addr); err != nil {
		return errAnswer(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return errAnswer(fmt.Errorf("read response of %s: %w", addr, err))
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
	return Answer{Who: strconv.Itoa(resp.StatusCode), Seen: strings.Join(strings.Fields(string(body)), " "), Peer: peerOf(raw.(*net.TCPConn))}
}

func greeting(s string) Answer {
	f := strings.Fields(s)
	a := Answer{}
	if len(f) > 0 {
		a.Who = f[0]
	}
	if len(f) > 1 {
		a.Seen = f[1]
	}
	return a
}

func clientSendto(addr string) Answer {
	to, err := netip.ParseAddrPort(addr)
	if err != nil {
		return errAnswer(err)
	}
	c, err := net.ListenUDP("udp4", nil)
	if err != nil {
		return errAnswer(err)
	}
	defer c.Close()
	if _, err := c.WriteToUDPAddrPort([]byte("who"), to); err != nil {
		return errAnswer(err)
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 1500)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		return errAnswer(err)
	}
	a := greeting(string(buf[:n]))
	a.Peer = from.String()
	a.Local = c.LocalAddr().String()
	return a
}

func connLoop(addr string, n int) Answer {
	to, err := net.ResolveTCPAddr("tcp4", addr)
	if err != nil {
		return errAnswer(err)
	}
	start := time.Now()
	for range n {
		c, err := net.DialTCP("tcp4", nil, to)
		if err != nil {
			return errAnswer(err)
		}
		c.SetLinger(0) // RST on close: no TIME_WAIT piles up over a long loop
		c.Close()
	}
	return Answer{Nanos: time.Since(start).Nanoseconds()}
}

// v4mapped is ADDR (a.b.c.d:port) as ::ffff:a.b.c.d.
func v4mapped(addr string) (*unix.SockaddrInet6, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, err
	}
	return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}, nil
}

// unmapped prints an IPv6 socket address as the IPv4 one it maps, if it does.
func unmapped(sa unix.Sockaddr) string {
	in6, ok := sa.(*unix.SockaddrInet6)
	if !ok {
		return fmt.Sprintf("%v", sa)
	}
	return netip.AddrPortFrom(netip.AddrFrom16(in6.Addr).Unmap(), uint16(in6.Port)).String()
}

// dualStackSocket is an AF_INET6 socket that may talk IPv4 (IPV6_V6ONLY off), with 3 s
// send and receive timeouts (the send one bounds connect()).
func dualStackSocket(typ int) (int, error) {
	fd, err := unix.Socket(unix.AF_INET6, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	tv := unix.Timeval{Sec: 3}
	for _, e := range []error{
		unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0),
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv),
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv),
	} {
		if e != nil {
			unix.Close(fd)
			return -1, e
		}
	}
	return fd, nil
}

func clientTCP6Mapped(addr string) Answer {
	sa, err := v4mapped(addr)
	if err != nil {
		return errAnswer(err)
	}
	fd, err := dualStackSocket(unix.SOCK_STREAM)
	if err != nil {
		return errAnswer(err)
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, sa); err != nil {
		return errAnswer(err)
	}
	var line []byte
	buf := make([]byte, 256)
	for !strings.Contains(string(line), "\n") {
		n, err := unix.Read(fd, buf)
		if err != nil {
			return errAnswer(fmt.Errorf("read greeting: %w", err))
		}
		if n == 0 {
			return errAnswer(io.ErrUnexpectedEOF)
		}
		line = append(line, buf[:n]...)
	}
	a := greeting(string(line))
	if p, err := unix.Getpeername(fd); err == nil {
		a.Peer = unmapped(p)
	}
	if l, err := unix.Getsockname(fd); err == nil {
		a.Local = unmapped(l)
	}
	return a
}

func clientSendto6Mapped(addr string) Answer {
	sa, err := v4mapped(addr)
	if err != nil {
		return errAnswer(err)
	}
	fd, err := dualStackSocket(unix.SOCK_DGRAM)
	if err != nil {
		return errAnswer(err)
	}
	defer unix.Close(fd)
	if err := unix.Sendto(fd, []byte("who"), 0, sa); err != nil {
		return errAnswer(err)
	}
	buf := make([]byte, 1500)
	n, from, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return errAnswer(err)
	}
	a := greeting(string(buf[:n]))
	a.Peer = unmapped(from)
	return a
}

func askHeld(c *net.UDPConn) Answer {
	if c == nil {
		return Answer{Err: "no UDP socket held"}
	}
	if _, err := c.Write([]byte("who")); err != nil {
		return errAnswer(err)
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 1500)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		return errAnswer(err)
	}
	a := greeting(string(buf[:n]))
	a.Peer = from.String()
	a.Local = c.LocalAddr().String()
	return a
}

// Client is a running client process. Commands: "tcp ADDR" (connect, read a greeting line
// "<who> <address the server saw>", report getpeername), "tcpt ADDR MS" (the same, giving up
// after MS milliseconds), "httpsget ADDR CAFILE PATH" (an HTTPS GET checked against a CA),
// "sendto ADDR" (one datagram from an
// unconnected socket), "tcp6m ADDR" and "sendto6m ADDR" (the same from a dual-stack IPv6
// socket to ::ffff:ADDR), "udpconn ADDR" (connect a UDP socket, keep it, ask once), "udpheld"
// (ask again on it), "connloop ADDR N" (N connect()+close(), timed).
type Client struct {
	t   testing.TB
	in  io.WriteCloser
	out *bufio.Scanner
}

// Start starts a client process in cgroup (a cgroup v2 directory; empty: the caller's own)
// and network namespace ns. It is stopped when the test ends.
func Start(t testing.TB, ns netns.NsHandle, cgroup string) *Client {
	t.Helper()
	nsfd, err := unix.Dup(int(ns))
	if err != nil {
		t.Fatal(err)
	}
	nsFile := os.NewFile(uintptr(nsfd), "netns")
	defer nsFile.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), Env+"=1")
	cmd.ExtraFiles = []*os.File{nsFile}
	if cgroup != "" {
		cg, err := os.Open(cgroup)
		if err != nil {
			t.Fatal(err)
		}
		defer cg.Close()
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	}
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start a client process in cgroup %s: %v", cgroup, err)
	}
	t.Cleanup(func() {
		in.Close()
		if err := cmd.Wait(); err != nil {
			t.Errorf("client process in %s: %v", cgroup, err)
		}
	})
	return &Client{t: t, in: in, out: bufio.NewScanner(out)}
}

func (c *Client) Do(cmd string) Answer {
	c.t.Helper()
	if _, err := fmt.Fprintln(c.in, cmd); err != nil {
		c.t.Fatalf("send %q to the client process: %v", cmd, err)
	}
	if !c.out.Scan() {
		c.t.Fatalf("client process gave no answer to %q: %v", cmd, c.out.Err())
	}
	var a Answer
	if err := json.Unmarshal(c.out.Bytes(), &a); err != nil {
		c.t.Fatalf("answer to %q: %v (%s)", cmd, err, c.out.Bytes())
	}
	return a
}

// OK runs cmd and fails the test on an error answer.
func (c *Client) OK(cmd string) Answer {
	c.t.Helper()
	a := c.Do(cmd)
	if a.Err != "" {
		c.t.Fatalf("%s: %s", cmd, a.Err)
	}
	return a
}
