//go:build linux

package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"

	"github.com/tern-net/tern/internal/nsutil"
)

// Pod is a pod sandbox of the lab: a network namespace wired by tern-cni.
type Pod struct {
	Namespace, Name, UID string
	ContainerID          string // the sandbox's ID (a new one per retried ADD, as the kubelet does)
	Node                 *Node
	IP                   netip.Addr
	Result               *current.Result
	// Attempts is how many ADDs it took (retries after "try again later").
	Attempts int

	ns netns.NsHandle
}

// Key is namespace/name.
func (p *Pod) Key() string { return p.Namespace + "/" + p.Name }

// NS is the pod's network namespace.
func (p *Pod) NS() netns.NsHandle { return p.ns }

// NetNSPath is the path given to the CNI: the lab process's fd of the namespace.
func (p *Pod) NetNSPath() string { return nsPath(p.ns) }

func nsPath(ns netns.NsHandle) string { return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), int(ns)) }

func (p *Pod) runtimeConf() *libcni.RuntimeConf {
	return runtimeConf(p.Namespace, p.Name, p.UID, p.ContainerID, p.ns)
}

// runtimeConf is what containerd passes for a sandbox: CNI_ARGS with IgnoreUnknown and the
// K8S_POD_* keys, and the capability arguments the conflist declares.
func runtimeConf(namespace, name, uid, containerID string, ns netns.NsHandle) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: containerID,
		NetNS:       nsPath(ns),
		IfName:      "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", namespace},
			{"K8S_POD_NAME", name},
			{"K8S_POD_INFRA_CONTAINER_ID", containerID},
			{"K8S_POD_UID", uid},
		},
		CapabilityArgs: map[string]any{
			"portMappings":                      []any{},
			"io.kubernetes.cri.pod-annotations": map[string]string{"kubernetes.io/config.source": "lab"},
		},
	}
}

// AddPod creates a pod sandbox on node (0-based) and runs CNI ADD for it. Like the kubelet,
// it retries an ADD that fails with code 11 ("try again later") — after a DEL of the failed
// sandbox, with a new sandbox ID — until ctx ends; any other error is returned (as a
// *types.Error when the plugin reported one) after the failed sandbox is deleted.
func (l *Lab) AddPod(ctx context.Context, node int, namespace, name string) (*Pod, error) {
	n := l.nodes[node]
	l.mu.Lock()
	if _, dup := l.pods[namespace+"/"+name]; dup {
		l.mu.Unlock()
		return nil, fmt.Errorf("lab: pod %s/%s already exists", namespace, name)
	}
	l.mu.Unlock()
	ns, err := nsutil.NewAnon()
	if err != nil {
		return nil, fmt.Errorf("lab: namespace of pod %s/%s: %w", namespace, name, err)
	}
	p := &Pod{Namespace: namespace, Name: name, UID: randHex(8), Node: n, ns: ns}
	delay := 50 * time.Millisecond
	for {
		p.Attempts++
		p.ContainerID = randHex(32)
		res, err := n.cni.AddNetworkList(ctx, n.list, p.runtimeConf())
		if err == nil {
			if p.Result, err = current.NewResultFromResult(res); err != nil || len(p.Result.IPs) == 0 {
				ns.Close()
				return nil, fmt.Errorf("lab: ADD of %s/%s returned %v: %v", namespace, name, res, err)
			}
			p.IP, _ = netip.AddrFromSlice(p.Result.IPs[0].Address.IP.To4())
			break
		}
		// The kubelet's runtime tears a failed sandbox down before trying again.
		_ = n.cni.DelNetworkList(ctx, n.list, p.runtimeConf())
		te, ok := CNIError(err)
		if !ok || te.Code != types.ErrTryAgainLater {
			ns.Close()
			return nil, err
		}
		l.log.Debug("ADD says try again", zap.String("pod", p.Key()), zap.Int("attempt", p.Attempts), zap.Error(err))
		select {
		case <-ctx.Done():
			ns.Close()
			return nil, fmt.Errorf("lab: pod %s/%s: %w after %d attempts (last: %v)", namespace, name, ctx.Err(), p.Attempts, err)
		case <-time.After(delay):
		}
		delay = min(2*delay, time.Second)
	}
	l.mu.Lock()
	l.pods[p.Key()] = p
	l.mu.Unlock()
	return p, nil
}

// DeletePod runs CNI DEL for the pod, retrying "try again later" until ctx ends, then
// destroys its namespace.
func (l *Lab) DeletePod(ctx context.Context, p *Pod) error {
	delay := 50 * time.Millisecond
	for {
		err := p.Node.cni.DelNetworkList(ctx, p.Node.list, p.runtimeConf())
		if err == nil {
			break
		}
		if te, ok := CNIError(err); !ok || te.Code != types.ErrTryAgainLater {
			return fmt.Errorf("lab: DEL of %s: %w", p.Key(), err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("lab: DEL of %s: %w (last: %v)", p.Key(), ctx.Err(), err)
		case <-time.After(delay):
		}
		delay = min(2*delay, time.Second)
	}
	l.Forget(p)
	return nil
}

// Forget drops the pod from the lab and destroys its namespace without any CNI call, like a
// sandbox that vanished while its node's runtime was down; GC is what cleans up after it.
func (l *Lab) Forget(p *Pod) {
	l.mu.Lock()
	if l.pods[p.Key()] == p {
		delete(l.pods, p.Key())
	}
	l.mu.Unlock()
	if p.ns.IsOpen() {
		p.ns.Close()
	}
}

// Check runs CNI CHECK for the pod.
func (l *Lab) Check(ctx context.Context, p *Pod) error {
	return p.Node.cni.CheckNetworkList(ctx, p.Node.list, p.runtimeConf())
}

// Exec runs fn on a thread inside the pod's network namespace.
func (p *Pod) Exec(fn func() error) error { return nsutil.Do(p.ns, fn) }

// Dial opens a TCP connection from inside the pod.
func (p *Pod) Dial(ctx context.Context, addr string) (net.Conn, error) {
	var c net.Conn
	err := p.Exec(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, "tcp4", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s from pod %s (%s): %w", addr, p.Key(), p.IP, err)
	}
	return c, nil
}

// Serve listens on TCP port inside the pod. Each connection is greeted with the pod's
// namespace/name and then echoed line by line, so a client can tell who answered. Close the
// returned closer to stop.
func (p *Pod) Serve(port int) (io.Closer, error) {
	var ln net.Listener
	err := p.Exec(func() error {
		var err error
		ln, err = net.Listen("tcp4", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on port %d in pod %s: %w", port, p.Key(), err)
	}
	s := &server{ln: ln}
	s.wg.Add(1)
	go s.serve(p.Key())
	return s, nil
}

type server struct {
	ln net.Listener
	wg sync.WaitGroup
}

func (s *server) serve(greeting string) {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(30 * time.Second))
			fmt.Fprintf(c, "%s\n", greeting)
			sc := bufio.NewScanner(c)
			for sc.Scan() {
				fmt.Fprintf(c, "%s\n", sc.Text())
			}
		}()
	}
}

func (s *server) Close() error {
	err := s.ln.Close()
	s.wg.Wait()
	return err
}

// Ask dials addr from the pod, reads the greeting of a Serve listener, sends msg and reads
// the echo. It returns the greeting (the serving pod's namespace/name).
func (p *Pod) Ask(ctx context.Context, addr, msg string) (string, error) {
	c, err := p.Dial(ctx, addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	} else {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	}
	r := bufio.NewReader(c)
	greeting, err := r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read greeting from %s: %w", addr, err)
	}
	if _, err := fmt.Fprintf(c, "%s\n", msg); err != nil {
		return "", err
	}
	echo, err := r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read echo from %s: %w", addr, err)
	}
	if echo[:len(echo)-1] != msg {
		return "", errors.New("echo mismatch from " + addr)
	}
	return greeting[:len(greeting)-1], nil
}
