package main

import (
	"context"
	"errors"
	"fmt"
	"github.com/tern-net/tern/test/bench/procmem"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/test/k8s/kubeletsim"
	"github.com/tern-net/tern/test/k8s/nsbridge"
)

const kpNode = "kube-proxy-bench"

type kpResult struct {
	mode string
	// coldStart is process start to the first sync after which the rules hold every
	// Service (checked on a sample); coldSync is that sync's own duration.
	coldStart, coldSync time.Duration
	// syncP50 is the median duration of the syncs kube-proxy ran during the changes.
	syncP50, syncMax time.Duration
	syncs            int
	rss, peak        uint64
	lat              stats
	// missing counts changed endpoints, still current, that the final rules lack.
	missing, checked int
	dumpTook         time.Duration
	// ruleset is kube-proxy's own count of what it wrote (its "Reloading" log line).
	ruleset string
}

// syncEvent is one "SyncProxyRules complete" line.
type syncEvent struct {
	at      time.Time
	elapsed time.Duration
}

// kpLog follows kube-proxy's -v=4 log. Its "Network programming" lines are logged right
// after a sync's rules were committed (iptables-restore or nft returned), one per
// EndpointSlice change carrying a trigger-time annotation, naming the Service: the
// arrival of that line is when the kernel held the change.
type kpLog struct {
	netProg, syncDone, reload *regexp.Regexp

	mu      sync.Mutex
	waiting []*change
	syncs   []syncEvent
	// lastReload is the latest "Reloading service ... data" line's counts (services,
	// endpoints and, in iptables mode, NAT chains and rules), and when it was logged:
	// what a sync that has not finished is busy writing.
	lastReload   string
	lastReloadAt time.Time
	synced       chan struct{} // a token per sync, for waiters
}

func newKPLog() *kpLog {
	return &kpLog{
		// klog's structured lines: `"Network programming" ... endpoint="bench/svc-00012"
		// elapsed=0.0123` and `"SyncProxyRules complete" ... elapsed="12.3ms"`.
		netProg:  regexp.MustCompile(`"Network programming".*\bendpoint="([^"]+)".*\belapsed=([0-9.eE+-]+)`),
		syncDone: regexp.MustCompile(`"SyncProxyRules complete".*\belapsed="([^"]+)"`),
		reload:   regexp.MustCompile(`"Reloading service \w+ data" ipFamily="IPv4" (.*)`),
		synced:   make(chan struct{}, 1),
	}
}

func (k *kpLog) line(at time.Time, s string) {
	if m := k.netProg.FindStringSubmatch(s); m != nil {
		elapsed, _ := strconv.ParseFloat(m[2], 64)
		k.mu.Lock()
		// Changes to one Service are programmed in write order, so the oldest waiting
		// change of that Service is the one this line reports.
		if i := slices.IndexFunc(k.waiting, func(ch *change) bool { return ch.key == m[1] }); i >= 0 {
			ch := k.waiting[i]
			ch.seen, ch.agentSays = at, secs(elapsed)
			k.waiting = slices.Delete(k.waiting, i, i+1)
		}
		k.mu.Unlock()
		return
	}
	if m := k.reload.FindStringSubmatch(s); m != nil {
		k.mu.Lock()
		k.lastReload, k.lastReloadAt = m[1], at
		k.mu.Unlock()
		return
	}
	if m := k.syncDone.FindStringSubmatch(s); m != nil {
		d, err := time.ParseDuration(m[1])
		if err != nil {
			return
		}
		k.mu.Lock()
		k.syncs = append(k.syncs, syncEvent{at: at, elapsed: d})
		k.mu.Unlock()
		select {
		case k.synced <- struct{}{}:
		default:
		}
	}
}

func (k *kpLog) syncsSince(t time.Time) []syncEvent {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []syncEvent
	for _, s := range k.syncs {
		if !s.at.Before(t) {
			out = append(out, s)
		}
	}
	return out
}

func (k *kpLog) lastSync() (syncEvent, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.syncs) == 0 {
		return syncEvent{}, false
	}
	return k.syncs[len(k.syncs)-1], true
}

// reloadInfo describes the latest rule reload for the report.
func (k *kpLog) reloadInfo() (string, time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.lastReload, k.lastReloadAt
}

func (k *kpLog) expect(ch *change) {
	k.mu.Lock()
	k.waiting = append(k.waiting, ch)
	k.mu.Unlock()
}

func (k *kpLog) forget(ch *change) {
	k.mu.Lock()
	k.waiting = slices.DeleteFunc(k.waiting, func(c *change) bool { return c == ch })
	k.mu.Unlock()
}

func (k *kpLog) pending() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.waiting)
}

// close stops matching: later lines no longer touch the changes.
func (k *kpLog) close() {
	k.mu.Lock()
	k.waiting = nil
	k.mu.Unlock()
}

// kpEnv is kube-proxy's private network namespace, with the apiserver bridged in.
type kpEnv struct {
	thread *nsThread
	bridge *nsbridge.Bridge
	path   string // PATH for kube-proxy and the dump tools (iptables-legacy links first)
	tmp    string
}

func (k *kpEnv) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "PATH="+k.path)
	if lp, err := lookPathIn(name, k.path); err == nil {
		cmd.Path = lp
	}
	return cmd
}

func lookPathIn(name, path string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	for _, dir := range filepath.SplitList(path) {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in PATH %s", name, path)
}

// output runs a short command inside the namespace.
func (k *kpEnv) output(name string, args ...string) ([]byte, error) {
	cmd := k.command(name, args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := k.thread.start(cmd); err != nil {
		return nil, fmt.Errorf("start %s in kube-proxy's namespace: %w", name, err)
	}
	if err := cmd.Wait(); err != nil {
		return nil, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return []byte(out.String()), nil
}

// dump returns the NAT rules kube-proxy wrote, in the mode's own tool.
func (k *kpEnv) dump(mode string) (string, error) {
	var out []byte
	var err error
	switch mode {
	case "nftables":
		out, err = k.output("nft", "list", "table", "ip", "kube-proxy")
	default:
		out, err = k.output("iptables-save", "-t", "nat")
	}
	return string(out), err
}

// holdsAll returns the addresses the rules lack as a DNAT target on the target port.
// iptables writes "--to-destination A:8080"; kube-proxy's nftables mode puts endpoints in
// a numgen map that nft lists as "A . 8080".
func holdsAll(rules string, addrs []netip.Addr) (missing []netip.Addr) {
	port := strconv.Itoa(targetPort)
	for _, a := range addrs {
		if !strings.Contains(rules, " "+a.String()+":"+port) && !strings.Contains(rules, " "+a.String()+" . "+port) {
			missing = append(missing, a)
		}
	}
	return missing
}

func runKubeProxy(ctx context.Context, e *env, size int, mode string) (res *kpResult, retErr error) {
	res = &kpResult{mode: mode}
	ns, err := nsutil.NewAnon()
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	thread, err := newNSThread(ns)
	if err != nil {
		return nil, err
	}
	// Deferred calls run in reverse, so this runs after kube-proxy has been stopped; the
	// thread's exit would otherwise SIGKILL it (Pdeathsig) before it could clean up.
	defer thread.close()
	apiHost := strings.TrimPrefix(e.cp.APIServerURL(), "https://")
	bridge, err := nsbridge.Start(nsbridge.Config{NS: ns, Target: apiHost})
	if err != nil {
		return nil, err
	}
	defer bridge.Close()
	kenv := &kpEnv{thread: thread, bridge: bridge, path: os.Getenv("PATH")}
	if mode == "iptables-legacy" {
		dir, err := legacyPath(e.logDir, size)
		if err != nil {
			return nil, err
		}
		kenv.path = dir + ":" + kenv.path
	}
	if _, err := kubeletsim.EnsureNode(ctx, e.client, kpNode, "10.255.255.1"); err != nil {
		return nil, err
	}

	proxyMode := mode
	if mode == "iptables-legacy" {
		proxyMode = "iptables"
	}
	args := []string{
		"--kubeconfig=" + e.cp.KubeconfigPath(),
		"--hostname-override=" + kpNode,
		"--proxy-mode=" + proxyMode,
		"--cluster-cidr=172.16.0.0/12",
		// Global (not per-namespace) conntrack settings stay as they are.
		"--conntrack-max-per-core=0",
		"--conntrack-tcp-timeout-established=0",
		"--conntrack-tcp-timeout-close-wait=0",
		"--nodeport-addresses=primary",
		"--metrics-bind-address=127.0.0.1:10249",
		"--healthz-bind-address=127.0.0.1:10256",
		// Level 4 logs one "Network programming" line per programmed change; see kpLog.
		"-v=4",
	}
	log := newKPLog()
	cmd := kenv.command(e.kubeProxy, args...)
	start := time.Now()
	kp, err := startChild(thread, "kube-proxy", cmd, filepath.Join(e.logDir, fmt.Sprintf("kube-proxy-%s-%d.log", mode, size)), log.line)
	if err != nil {
		return nil, err
	}
	defer func() {
		kp.stop(15 * time.Second)
		// kube-proxy's own children (an iptables-restore of a large ruleset) outlive it
		// when it is stopped mid-sync; only processes in our namespace are touched.
		if n, err := killNamespaceProcs(ns); err != nil {
			retErr = errors.Join(retErr, err)
		} else if n > 0 {
			e.logf("killed %d process(es) kube-proxy left in its namespace", n)
		}
		// Nothing outlives the namespace, but --cleanup is what an operator switching
		// modes runs; a failure here means the mode left state kube-proxy cannot remove.
		if out, err := kenv.output(e.kubeProxy, "--cleanup", "-v=0"); err != nil {
			retErr = errors.Join(retErr, fmt.Errorf("kube-proxy --cleanup after %s: %w (%s)", mode, err, out))
		}
	}()

	// Initial sync: wait for a sync after which the rules hold the last Service's endpoints.
	var sample []netip.Addr
	for _, ep := range e.cl.slices[size-1].Endpoints {
		sample = append(sample, netip.MustParseAddr(ep.Addresses[0]))
	}
	deadline := time.NewTimer(e.cfg.kpStartTimeout)
	defer deadline.Stop()
	// Checked after every sync, and every few seconds in case a sync's token was
	// coalesced with an earlier one.
	recheck := time.NewTicker(3 * time.Second)
	defer recheck.Stop()
	// The last dump that failed the check, for a reader of a failed run.
	rulesPath := filepath.Join(e.logDir, fmt.Sprintf("rules-%s-%d.txt", mode, size))
	for done := false; !done; {
		select {
		case <-log.synced:
		case <-recheck.C:
		case <-kp.exited:
			return nil, kp.exitedErr()
		case <-deadline.C:
			what, since := log.reloadInfo()
			if what == "" {
				return res, fmt.Errorf("kube-proxy (%s) did not start programming %d Services within %s (see its log)", mode, size, e.cfg.kpStartTimeout)
			}
			return res, fmt.Errorf("kube-proxy (%s) did not finish its first sync of %d Services within %s: it had been writing %s for %s",
				mode, size, e.cfg.kpStartTimeout, what, time.Since(since).Round(time.Second))
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		ev, ok := log.lastSync()
		if !ok {
			continue
		}
		rules, err := kenv.dump(mode)
		if err != nil {
			return nil, err
		}
		if len(holdsAll(rules, sample)) == 0 {
			res.coldStart, res.coldSync, done = ev.at.Sub(start), ev.elapsed, true
		} else {
			_ = os.WriteFile(rulesPath, []byte(rules), 0o644)
		}
	}
	res.ruleset, _ = log.reloadInfo()
	e.logf("kube-proxy %s, %d Services: initial sync %s (%s after start); measuring %d changes",
		mode, size, res.coldSync, res.coldStart, e.cfg.changes)

	began := time.Now()
	chs, err := measure(ctx, e.cl, log, e.cfg.changes, e.cfg.rate, e.cfg.drain)
	if err != nil {
		return nil, err
	}
	res.lat = summarize(chs)
	var durs []time.Duration
	for _, s := range log.syncsSince(began) {
		durs = append(durs, s.elapsed)
	}
	slices.Sort(durs)
	res.syncs, res.syncP50 = len(durs), quantile(durs, 0.5)
	if len(durs) > 0 {
		res.syncMax = durs[len(durs)-1]
	}
	if res.rss, res.peak, err = procmem.Read(kp.pid()); err != nil {
		return nil, err
	}

	// Ground truth for the log-based timing: every changed endpoint still current must
	// be a DNAT target in the final rules.
	var current []netip.Addr
	for _, ch := range chs {
		if e.cl.current(ch.svc, ch.addr) {
			current = append(current, ch.addr)
		}
	}
	t0 := time.Now()
	rules, err := kenv.dump(mode)
	if err != nil {
		return nil, err
	}
	res.dumpTook = time.Since(t0)
	res.checked, res.missing = len(current), len(holdsAll(rules, current))
	return res, nil
}

// legacyPath makes a directory whose iptables* names point at the -legacy binaries, for
// kube-proxy's iptables mode on the legacy (x_tables) backend.
func legacyPath(logDir string, size int) (string, error) {
	dir := filepath.Join(logDir, fmt.Sprintf("iptables-legacy-%d", size))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", dir, err)
	}
	for _, n := range []string{"iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"} {
		target, err := exec.LookPath(strings.Replace(n, "tables", "tables-legacy", 1))
		if err != nil {
			return "", fmt.Errorf("iptables-legacy mode needs %s-legacy (apt-get install iptables): %w", n, err)
		}
		if err := os.Symlink(target, filepath.Join(dir, n)); err != nil && !os.IsExist(err) {
			return "", fmt.Errorf("link %s: %w", n, err)
		}
	}
	return dir, nil
}

// killNamespaceProcs SIGKILLs every process whose network namespace is ns (by inode),
// and waits briefly for them to go.
func killNamespaceProcs(ns netns.NsHandle) (int, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(ns), &st); err != nil {
		return 0, fmt.Errorf("stat kube-proxy's namespace: %w", err)
	}
	want := fmt.Sprintf("net:[%d]", st.Ino)
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, fmt.Errorf("list /proc: %w", err)
	}
	var pids []int
	for _, de := range entries {
		pid, err := strconv.Atoi(de.Name())
		if err != nil {
			continue
		}
		if link, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid)); err == nil && link == want {
			if unix.Kill(pid, unix.SIGKILL) == nil {
				pids = append(pids, pid)
			}
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range pids {
		for unix.Kill(pid, 0) == nil && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
	}
	return len(pids), nil
}
