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
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/test/k8s/kubeletsim"
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
	// HostPorts are the sandbox's portMappings, as the kubelet passes a pod's hostPorts.
	HostPorts []api.PortMapping
	// Annotations the runtime passes (io.kubernetes.cri.pod-annotations) besides the lab's.
	Annotations map[string]string

	ns   netns.NsHandle
	kube bool // made by RunPod: a Pod object exists

	smu     sync.Mutex
	servers []io.Closer // Serve and ServeHTTP listeners, stopped with the pod
}

func (p *Pod) track(c io.Closer) {
	p.smu.Lock()
	p.servers = append(p.servers, c)
	p.smu.Unlock()
}

// stopServers closes the pod's listeners, as the containers stop before the sandbox goes.
func (p *Pod) stopServers() {
	p.smu.Lock()
	s := p.servers
	p.servers = nil
	p.smu.Unlock()
	for _, c := range s {
		_ = c.Close()
	}
}

// Key is namespace/name.
func (p *Pod) Key() string { return p.Namespace + "/" + p.Name }

// NS is the pod's network namespace.
func (p *Pod) NS() netns.NsHandle { return p.ns }

// NetNSPath is the path given to the CNI: the lab process's fd of the namespace.
func (p *Pod) NetNSPath() string { return nsPath(p.ns) }

func nsPath(ns netns.NsHandle) string { return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), int(ns)) }

func (p *Pod) runtimeConf() *libcni.RuntimeConf {
	rc := runtimeConf(p.Namespace, p.Name, p.UID, p.ContainerID, p.ns)
	if len(p.HostPorts) > 0 {
		pms := make([]any, len(p.HostPorts))
		for i, m := range p.HostPorts {
			pms[i] = m
		}
		rc.CapabilityArgs["portMappings"] = pms
	}
	if len(p.Annotations) > 0 {
		ann := map[string]string{"kubernetes.io/config.source": "lab"}
		for k, v := range p.Annotations {
			ann[k] = v
		}
		rc.CapabilityArgs["io.kubernetes.cri.pod-annotations"] = ann
	}
	return rc
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
//
// In a Kubernetes lab use RunPod: no Pod object backs an AddPod pod, so the agent's pod
// garbage collection releases its address within about two minutes.
func (l *Lab) AddPod(ctx context.Context, node int, namespace, name string) (*Pod, error) {
	return l.addPod(ctx, l.nodes[node], namespace, name, randHex(8))
}

// AddPodWithHostPorts is AddPod for a pod with hostPorts: the runtime passes them to the
// CNI as the portMappings capability.
func (l *Lab) AddPodWithHostPorts(ctx context.Context, node int, namespace, name string, hostPorts []api.PortMapping) (*Pod, error) {
	return l.addPod(ctx, l.nodes[node], namespace, name, randHex(8), hostPorts...)
}

// AddPodAnnotated is AddPod for a pod whose runtime passes these annotations to the CNI (the
// io.kubernetes.cri.pod-annotations capability), e.g. k8s.aliyun.com/eni for an exclusive ENI.
func (l *Lab) AddPodAnnotated(ctx context.Context, node int, namespace, name string, annotations map[string]string) (*Pod, error) {
	return l.addPodWith(ctx, l.nodes[node], namespace, name, randHex(8), annotations)
}

func (l *Lab) addPod(ctx context.Context, n *Node, namespace, name, uid string, hostPorts ...api.PortMapping) (*Pod, error) {
	return l.addPodWith(ctx, n, namespace, name, uid, nil, hostPorts...)
}

func (l *Lab) addPodWith(ctx context.Context, n *Node, namespace, name, uid string, annotations map[string]string, hostPorts ...api.PortMapping) (*Pod, error) {
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
	p := &Pod{Namespace: namespace, Name: name, UID: uid, Node: n, ns: ns, HostPorts: hostPorts, Annotations: annotations}
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
		// The kubelet's runtime tears a failed sandbox down before trying again, and retries
		// the teardown while the agent cannot answer (a sandbox whose ADD was cut short by an
		// agent crash may hold an address).
		if derr := n.del(ctx, p.runtimeConf()); derr != nil {
			ns.Close()
			return nil, fmt.Errorf("lab: tear down failed sandbox of %s/%s: %w", namespace, name, derr)
		}
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

// DeletePod removes a pod as the kubelet would: for a RunPod pod it deletes the Pod object
// first (grace period 0), then stops the pod's servers, then runs CNI DEL, retrying "try
// again later" until ctx ends, and finally destroys its namespace.
func (l *Lab) DeletePod(ctx context.Context, p *Pod) error {
	if p.kube && l.kube != nil {
		if err := kubeletsim.DeletePod(ctx, l.kube.client, p.Namespace, p.Name); err != nil {
			return fmt.Errorf("lab: %w", err)
		}
	}
	p.stopServers()
	if err := p.Node.del(ctx, p.runtimeConf()); err != nil {
		return fmt.Errorf("lab: DEL of %s: %w", p.Key(), err)
	}
	l.Forget(p)
	return nil
}

// del runs CNI DEL, retrying "try again later" (the agent is restarting) until ctx ends.
func (n *Node) del(ctx context.Context, rc *libcni.RuntimeConf) error {
	delay := 50 * time.Millisecond
	for {
		err := n.cni.DelNetworkList(ctx, n.list, rc)
		if err == nil {
			return nil
		}
		if te, ok := CNIError(err); !ok || te.Code != types.ErrTryAgainLater {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-time.After(delay):
		}
		delay = min(2*delay, time.Second)
	}
}

// Forget drops the pod from the lab and destroys its namespace without any CNI call, like a
// sandbox that vanished while its node's runtime was down; GC is what cleans up after it.
func (l *Lab) Forget(p *Pod) {
	l.mu.Lock()
	if l.pods[p.Key()] == p {
		delete(l.pods, p.Key())
	}
	l.mu.Unlock()
	p.stopServers()
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
	return p.DialFrom(ctx, addr, 0)
}

// DialFrom opens a TCP connection from inside the pod with the given source port (0: any),
// reusing it even while an earlier connection from it is in TIME_WAIT (SO_REUSEADDR), as a
// busy client's kernel reuses ephemeral ports.
func (p *Pod) DialFrom(ctx context.Context, addr string, localPort int) (net.Conn, error) {
	var c net.Conn
	err := p.Exec(func() error {
		var d net.Dialer
		if localPort != 0 {
			d.LocalAddr = &net.TCPAddr{Port: localPort}
			d.Control = func(_, _ string, rc syscall.RawConn) error {
				var serr error
				if err := rc.Control(func(fd uintptr) {
					serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
				}); err != nil {
					return err
				}
				return serr
			}
		}
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
	p.track(s)
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
			// An idle limit, not a lifetime: the chaos tests hold flows open across faults
			// that take longer than any one exchange.
			_ = c.SetDeadline(time.Now().Add(30 * time.Second))
			fmt.Fprintf(c, "%s\n", greeting)
			sc := bufio.NewScanner(c)
			for sc.Scan() {
				_ = c.SetDeadline(time.Now().Add(30 * time.Second))
				fmt.Fprintf(c, "%s\n", sc.Text())
			}
		}()
	}
}

// Close stops the listener; closing twice (the caller, then the pod's deletion) is fine.
func (s *server) Close() error {
	err := s.ln.Close()
	s.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
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
