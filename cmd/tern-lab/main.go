//go:build linux

// Command tern-lab runs the Kubernetes lab of test/lab from the command line: a VPC and N
// node namespaces on this machine, a real tern-agent per node, the ECS emulator, and a real
// control plane (etcd, kube-apiserver, kube-controller-manager) on loopback, with tern-lab
// itself playing the kubelet. `up` leaves a daemon running that owns all of it; the other
// commands talk to that daemon over a unix socket, and `down` removes everything.
// `make demo` is `tern-lab up` followed by `tern-lab demo`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/tern-net/tern/ternctl"
)

const usage = `usage: tern-lab <command> [flags]

  up     [-nodes 2] [-dir /run/tern-lab]   start the lab (a daemon) and wait until it is ready
  down   [-dir ...]                        tear everything down (idempotent; also after a crash)
  status [-dir ...]                        nodes, pods, kubeconfig, pin root
  demo   [-dir ...] [-requests 30]         the guided walk-through of make demo
  pod run [-n NS] [-node node-1] [-l k=v,...] [-http PORT] [-serve PORT] NAME
  pod delete [-n NS] NAME
  ask    [-n NS] [-count 10] [-tcp] POD HOST:PORT   requests from a pod, one connection each
  exec   [-n NS] POD|NODE|external -- COMMAND...   run a command in a pod's, a node's (as a host-network
                                         process: the node's namespace and cgroup) or the external client's namespace
  probe  [-count 1] HOST:PORT             HTTP GETs, one connection each, one JSON line per answer (with getpeername)
  ternctl NODE COMMAND...                            ternctl on a node (service list, bpf ct list, ipam show, -o json)

Every command takes -dir (default /run/tern-lab). Run as root.
`

func main() {
	ctx, stop := signalContext()
	defer stop()
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	cmds := map[string]func(context.Context, []string) error{
		"up": cmdUp, "down": cmdDown, "status": cmdStatus, "demo": cmdDemo, "pod": cmdPod, "ask": cmdAsk,
		"exec": cmdExec, "ternctl": cmdTernctl, "daemon": cmdDaemon, "probe": cmdProbe,
	}
	fn, ok := cmds[os.Args[1]]
	if !ok {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err := fn(ctx, os.Args[2:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		fmt.Fprintln(os.Stderr, "tern-lab:", err)
		os.Exit(1)
	}
}

func cmdStatus(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	dir := fs.String("dir", defaultDir, "lab directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	st, err := newClient(*dir, 10*time.Second).status(ctx)
	if err != nil {
		return err
	}
	printStatus(st)
	return nil
}

// parseArgs parses flags that may come before, between or after positional arguments
// (`ask client 10.96.0.10:80 -count 5` as well as `ask -count 5 client ...`); "--" ends
// flag parsing, and it and everything after it stay positional.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		// flag.Parse consumed a "--" right before rest, if there was one.
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			return append(append(pos, "--"), rest...), nil
		}
		if len(rest) == 0 {
			return pos, nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// splitPod reads "ns/name" or "name" (in defNS).
func splitPod(s, defNS string) (string, string) {
	if ns, name, ok := strings.Cut(s, "/"); ok {
		return ns, name
	}
	return defNS, s
}

func cmdPod(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New("pod: want `pod run ...` or `pod delete ...`")
	}
	fs := flag.NewFlagSet("pod "+args[0], flag.ContinueOnError)
	dir := fs.String("dir", defaultDir, "lab directory")
	ns := fs.String("n", "default", "namespace")
	switch args[0] {
	case "run":
		node := fs.String("node", "", "node name (default: the node with the fewest pods)")
		labels := fs.String("l", "", "labels k=v,k=v")
		httpPort := fs.Int("http", 0, "serve HTTP on this port (answers \"hello from <pod> on <node> (<ip>), client <source it saw>\")")
		servePort := fs.Int("serve", 0, "serve the TCP greeting/echo protocol on this port")
		pos, err := parseArgs(fs, args[1:])
		if err != nil {
			return err
		}
		if len(pos) != 1 {
			return errors.New("pod run: want exactly one pod name")
		}
		pns, name := splitPod(pos[0], *ns)
		req := PodRequest{Namespace: pns, Name: name, Node: *node, HTTPPort: *httpPort, ServePort: *servePort,
			Labels: map[string]string{}}
		if *labels != "" {
			for _, kv := range strings.Split(*labels, ",") {
				k, v, ok := strings.Cut(kv, "=")
				if !ok {
					return fmt.Errorf("label %q: want key=value", kv)
				}
				req.Labels[k] = v
			}
		}
		var p PodInfo
		if err := newClient(*dir, 3*time.Minute).do(ctx, "POST", "/v1/pods", req, &p); err != nil {
			return err
		}
		fmt.Printf("pod %s/%s running on %s with IP %s (uid %s)\n", p.Namespace, p.Name, p.Node, p.IP, p.UID)
		return nil
	case "delete":
		pos, err := parseArgs(fs, args[1:])
		if err != nil {
			return err
		}
		if len(pos) != 1 {
			return errors.New("pod delete: want exactly one pod name")
		}
		pns, name := splitPod(pos[0], *ns)
		if err := newClient(*dir, 2*time.Minute).do(ctx, "DELETE", "/v1/pods/"+pns+"/"+name, nil, nil); err != nil {
			return err
		}
		fmt.Printf("pod %s/%s deleted\n", pns, name)
		return nil
	}
	return fmt.Errorf("pod: unknown subcommand %q (want run or delete)", args[0])
}

func cmdAsk(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("ask", flag.ContinueOnError)
	dir := fs.String("dir", defaultDir, "lab directory")
	ns := fs.String("n", "default", "namespace of the pod")
	count := fs.Int("count", 10, "number of requests (each on its own connection)")
	tcp := fs.Bool("tcp", false, "speak the greeting/echo protocol instead of HTTP")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return errors.New("ask: want POD HOST:PORT")
	}
	pns, name := splitPod(pos[0], *ns)
	res, err := ask(ctx, newClient(*dir, 5*time.Minute), AskRequest{Namespace: pns, Pod: name, Addr: pos[1], Count: *count, TCP: *tcp})
	if err != nil {
		return err
	}
	printTally(res, "  ")
	return nil
}

func ask(ctx context.Context, c *client, req AskRequest) (*AskResult, error) {
	var res AskResult
	if err := c.do(ctx, "POST", "/v1/ask", req, &res); err != nil {
		return nil, err
	}
	return &res, nil
}

// printTally prints how many requests each answer got, with a bar, then the errors.
func printTally(res *AskResult, indent string) {
	count := map[string]int{}
	for _, a := range res.Answers {
		count[a]++
	}
	keys := make([]string, 0, len(count))
	for k := range count {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	width := 0
	for _, k := range keys {
		width = max(width, len(k))
	}
	for _, k := range keys {
		fmt.Printf("%s%-*s  %3d  %s\n", indent, width, k, count[k], strings.Repeat("#", count[k]))
	}
	errs := map[string]int{}
	for _, e := range res.Errors {
		errs[e]++
	}
	for e, n := range errs {
		fmt.Printf("%sfailed %d×: %s\n", indent, n, e)
	}
}

// cmdExec runs a command in a pod's or node's network namespace, opened through the
// daemon's file descriptor (the namespaces are anonymous: they live as long as the daemon).
func cmdExec(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("exec", flag.ContinueOnError)
	dir := fs.String("dir", defaultDir, "lab directory")
	ns := fs.String("n", "default", "namespace of the pod")
	rest, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(rest) < 3 || rest[1] != "--" {
		return errors.New("exec: want POD|NODE -- COMMAND [ARGS...]")
	}
	st, err := newClient(*dir, 10*time.Second).status(ctx)
	if err != nil {
		return err
	}
	path, cgroup := "", ""
	for _, n := range st.Nodes {
		if n.Name == rest[0] {
			// A node's command runs in the node's cgroup too: a host-network process that
			// the node's socket hooks load-balance.
			path, cgroup = n.NetNS, n.Cgroup
		}
	}
	if rest[0] == externalName {
		path = st.External.NetNS
	}
	pns, name := splitPod(rest[0], *ns)
	for _, p := range st.Pods {
		if p.Namespace == pns && p.Name == name {
			path = p.NetNS
		}
	}
	if path == "" {
		return fmt.Errorf("exec: no node or pod %q (tern-lab status lists them)", rest[0])
	}
	cmd := exec.CommandContext(ctx, rest[2], rest[3:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := runIn(cmd, path, cgroup); err != nil {
		return fmt.Errorf("exec in %s: %w", rest[0], err)
	}
	return cmd.Wait()
}

func cmdTernctl(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("ternctl", flag.ContinueOnError)
	dir := fs.String("dir", defaultDir, "lab directory")
	// Flags after NODE are ternctl's (-o json, --pod ...): parse only those before it.
	if err := fs.Parse(args); err != nil {
		return err
	}
	pos := fs.Args()
	if len(pos) < 2 {
		return fmt.Errorf("ternctl: want NODE COMMAND... (tern-lab ternctl node-0 status; ternctl --help lists commands)")
	}
	st, err := newClient(*dir, 10*time.Second).status(ctx)
	if err != nil {
		return err
	}
	for _, n := range st.Nodes {
		if n.Name == pos[0] {
			return ternctl.Print(ctx, os.Stdout, n.PinRoot, n.Socket, pos[1:]...)
		}
	}
	names := make([]string, 0, len(st.Nodes))
	for _, n := range st.Nodes {
		names = append(names, n.Name)
	}
	return fmt.Errorf("ternctl: no node %q (nodes: %s)", pos[0], strings.Join(names, ", "))
}

// binHint is how to call this binary from the current directory, for messages.
func binHint() string {
	exe, err := os.Executable()
	if err != nil {
		return "tern-lab"
	}
	if rel, err := filepath.Rel(mustGetwd(), exe); err == nil && !strings.HasPrefix(rel, "..") {
		return "./" + rel
	}
	return exe
}

func mustGetwd() string {
	wd, err := os.Getwd()
	if err != nil {
		return "/"
	}
	return wd
}
