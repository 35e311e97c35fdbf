//go:build linux

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/nsutil"
)

// externalName is how commands name the lab's external client (exec, the status table).
const externalName = "external"

// probeAnswer is one request of `tern-lab probe`: the answer's body, the socket's peer as
// getpeername reports it (with socket-level load balancing a ClusterIP, though the packets
// carried the backend's address), or the error.
type probeAnswer struct {
	Answer string `json:"answer,omitempty"`
	Peer   string `json:"peer,omitempty"`
	Err    string `json:"err,omitempty"`
}

// cmdProbe is a client process for the demo (and for anyone at a shell): count HTTP GETs to
// addr, each on a new connection, one JSON line per request. Run it through `tern-lab exec
// NODE -- tern-lab probe ...` and it is a host-network process of the node.
func cmdProbe(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("probe", flag.ContinueOnError)
	count := fs.Int("count", 1, "number of requests (each on its own connection)")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return errors.New("probe: want HOST:PORT")
	}
	out := json.NewEncoder(os.Stdout)
	for range *count {
		if err := out.Encode(probeOnce(ctx, pos[0])); err != nil {
			return err
		}
	}
	return nil
}

func probeOnce(ctx context.Context, addr string) probeAnswer {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp4", addr)
	if err != nil {
		return probeAnswer{Err: err.Error()}
	}
	defer c.Close()
	a := probeAnswer{Peer: peerName(c.(*net.TCPConn))}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", addr); err != nil {
		return probeAnswer{Err: err.Error()}
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return probeAnswer{Err: fmt.Sprintf("read the answer of %s: %v", addr, err)}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if err != nil {
		return probeAnswer{Err: fmt.Sprintf("read the answer of %s: %v", addr, err)}
	}
	if resp.StatusCode != http.StatusOK {
		return probeAnswer{Err: fmt.Sprintf("%s answered HTTP %d", addr, resp.StatusCode)}
	}
	a.Answer = strings.TrimSpace(string(b))
	return a
}

// peerName is getpeername(2) of c: the address the socket is connected to as the process
// sees it (net.Conn's RemoteAddr is what was dialled, not what the kernel holds).
func peerName(c *net.TCPConn) string {
	rc, err := c.SyscallConn()
	if err != nil {
		return err.Error()
	}
	peer := ""
	if err := rc.Control(func(fd uintptr) {
		sa, err := unix.Getpeername(int(fd))
		if err != nil {
			peer = err.Error()
			return
		}
		if in4, ok := sa.(*unix.SockaddrInet4); ok {
			peer = net.JoinHostPort(net.IP(in4.Addr[:]).String(), fmt.Sprint(in4.Port))
		}
	}); err != nil {
		return err.Error()
	}
	return peer
}

// runIn starts cmd in the network namespace at netnsPath and, if cgroup is set, straight
// into that cgroup (clone3 CLONE_INTO_CGROUP), so that the socket hooks attached there see
// it from its first socket. The caller waits for it.
func runIn(cmd *exec.Cmd, netnsPath, cgroup string) error {
	h, err := netns.GetFromPath(netnsPath)
	if err != nil {
		return fmt.Errorf("open the network namespace %s: %w", netnsPath, err)
	}
	defer h.Close()
	if cgroup != "" {
		cg, err := os.Open(cgroup)
		if err != nil {
			return fmt.Errorf("open the node's cgroup: %w", err)
		}
		defer cg.Close()
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	}
	// The child inherits the network namespace of the thread that forks it.
	return nsutil.Do(h, cmd.Start)
}

// probeFrom runs `tern-lab probe` in a namespace (and cgroup) of the lab and returns its
// answers.
func probeFrom(ctx context.Context, netnsPath, cgroup, addr string, count int) ([]probeAnswer, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, exe, "probe", "-count", fmt.Sprint(count), addr)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := runIn(cmd, netnsPath, cgroup); err != nil {
		return nil, err
	}
	var res []probeAnswer
	dec := json.NewDecoder(out)
	for {
		var a probeAnswer
		if err := dec.Decode(&a); err != nil {
			if !errors.Is(err, io.EOF) {
				_ = cmd.Wait()
				return nil, fmt.Errorf("read the probe's answers: %w", err)
			}
			break
		}
		res = append(res, a)
	}
	if err := cmd.Wait(); err != nil {
		return nil, fmt.Errorf("probe %s: %w", addr, err)
	}
	return res, nil
}
