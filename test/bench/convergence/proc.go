package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
)

// nsThread runs process starts (and nothing else) on one locked OS thread, optionally
// switched into a network namespace. Children inherit the forking thread's namespace, and
// the kernel sends Pdeathsig when that *thread* exits: a thread that lives exactly as long
// as the children it forked makes "the benchmark died" kill them, and makes every child of
// a namespaced thread run inside that namespace and nowhere else.
type nsThread struct {
	reqs chan func()
	done chan struct{}
}

// newNSThread starts the thread; ns < 0 means the caller's namespace.
func newNSThread(ns netns.NsHandle) (*nsThread, error) {
	t := &nsThread{reqs: make(chan func()), done: make(chan struct{})}
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: when the loop ends the goroutine exits with the thread locked,
		// so the runtime destroys a thread that may sit in a foreign namespace.
		runtime.LockOSThread()
		defer close(t.done)
		if ns >= 0 {
			if err := netns.Set(ns); err != nil {
				errc <- fmt.Errorf("enter namespace %s: %w", ns, err)
				return
			}
		}
		errc <- nil
		for fn := range t.reqs {
			fn()
		}
	}()
	if err := <-errc; err != nil {
		<-t.done
		return nil, err
	}
	return t, nil
}

func (t *nsThread) start(cmd *exec.Cmd) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	res := make(chan error, 1)
	t.reqs <- func() { res <- cmd.Start() }
	return <-res
}

// output runs a command on the thread's namespace and returns its stdout.
func (t *nsThread) output(name string, args ...string) ([]byte, error) {
	cmd := exec.Command(name, args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := t.start(cmd); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	if err := cmd.Wait(); err != nil {
		return nil, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return []byte(out.String()), nil
}

// close ends the thread; only once every child it started has exited.
func (t *nsThread) close() {
	close(t.reqs)
	<-t.done
}

// child is a long-running process whose output lines go to a log file and to a parser.
type child struct {
	name   string
	cmd    *exec.Cmd
	exited chan struct{}
	err    error
}

// startChild starts cmd on thread t. Each line the process writes (stdout and stderr
// both) is appended to logPath and handed to onLine with its arrival time, from one
// goroutine, in order.
func startChild(t *nsThread, name string, cmd *exec.Cmd, logPath string, onLine func(time.Time, string)) (*child, error) {
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("create %s log: %w", name, err)
	}
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	fmt.Fprintf(logf, "=== %s %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(cmd.Args, " "))
	if err := t.start(cmd); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s (%s): %w", name, cmd.Path, err)
	}
	c := &child{name: name, cmd: cmd, exited: make(chan struct{})}
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		defer logf.Close()
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 1<<20), 64<<20) // kube-proxy can log a whole nft table in one line
		for sc.Scan() {
			now := time.Now()
			line := sc.Text()
			fmt.Fprintln(logf, line)
			if onLine != nil {
				onLine(now, line)
			}
		}
		// Keep draining after a scanner error so the child never blocks on a full pipe.
		_, _ = io.Copy(logf, pr)
	}()
	go func() {
		c.err = cmd.Wait()
		pw.Close()
		<-readDone
		close(c.exited)
	}()
	return c, nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

// stop sends SIGTERM, waits up to grace, then SIGKILLs and waits.
func (c *child) stop(grace time.Duration) {
	select {
	case <-c.exited:
		return
	default:
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.exited:
	case <-time.After(grace):
		_ = c.cmd.Process.Kill()
		<-c.exited
	}
}

// exitedErr is non-nil once the process has exited, saying how.
func (c *child) exitedErr() error {
	select {
	case <-c.exited:
		return fmt.Errorf("%s exited early: %v", c.name, c.err)
	default:
		return nil
	}
}
