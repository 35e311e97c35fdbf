package controlplane

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// spawner starts child processes from one OS thread that stays alive, locked, until close.
//
// The kernel delivers Pdeathsig when the *thread* that forked the child exits, not the
// process. Go threads can exit under us: a goroutine that locks its thread and returns
// without unlocking (as nsutil does for threads left in another network namespace) takes
// the thread with it. Forking from a dedicated thread that lives as long as the control
// plane makes Pdeathsig mean "the test process died", which is what we want.
type spawner struct {
	reqs chan spawnRequest
	done chan struct{}
}

type spawnRequest struct {
	cmd *exec.Cmd
	res chan error
}

func newSpawner() *spawner {
	s := &spawner{reqs: make(chan spawnRequest), done: make(chan struct{})}
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer close(s.done)
		for r := range s.reqs {
			r.res <- r.cmd.Start()
		}
	}()
	return s
}

func (s *spawner) start(cmd *exec.Cmd) error {
	res := make(chan error, 1)
	s.reqs <- spawnRequest{cmd: cmd, res: res}
	return <-res
}

// close ends the spawner thread. Only call it once every child it started has exited.
func (s *spawner) close() {
	close(s.reqs)
	<-s.done
}

// process is one control-plane binary run with fixed arguments; it can be started again
// after it stopped (the apiserver restart needs that).
type process struct {
	name    string
	path    string
	args    []string
	logPath string
	log     *zap.Logger

	cmd    *exec.Cmd
	logFd  *os.File
	exited chan struct{} // closed when cmd has been waited for
	err    error         // cmd.Wait's result, valid after exited is closed
}

func (p *process) start(sp *spawner) error {
	logFd, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open %s log: %w", p.name, err)
	}
	cmd := exec.Command(p.path, p.args...)
	cmd.Stdout = logFd
	cmd.Stderr = logFd
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	fmt.Fprintf(logFd, "\n=== %s starting %s %s\n", time.Now().Format(time.RFC3339Nano), p.path, strings.Join(p.args, " "))
	if err := sp.start(cmd); err != nil {
		logFd.Close()
		return fmt.Errorf("start %s (%s): %w", p.name, p.path, err)
	}
	p.cmd, p.logFd = cmd, logFd
	p.exited = make(chan struct{})
	p.err = nil
	exited := p.exited
	go func() {
		err := cmd.Wait()
		p.err = err
		logFd.Close()
		close(exited)
	}()
	p.log.Info("process started", zap.String("process", p.name), zap.Int("pid", cmd.Process.Pid), zap.String("log", p.logPath))
	return nil
}

// running reports whether the process was started and has not exited.
func (p *process) running() bool {
	if p.cmd == nil {
		return false
	}
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// exitedErr returns a description of why the process is gone, with the tail of its log.
func (p *process) exitedErr() error {
	return fmt.Errorf("%s exited: %v (log %s):\n%s", p.name, p.err, p.logPath, tailFile(p.logPath, 15))
}

// stop sends SIGTERM, waits up to grace, then SIGKILLs. It is a no-op if not running.
func (p *process) stop(grace time.Duration) error {
	if !p.running() {
		return nil
	}
	start := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal %s (pid %d): %w", p.name, p.cmd.Process.Pid, err)
	}
	select {
	case <-p.exited:
	case <-time.After(grace):
		p.log.Warn("process ignored SIGTERM, killing", zap.String("process", p.name), zap.Duration("grace", grace))
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
	p.log.Info("process stopped", zap.String("process", p.name), zap.Duration("took", time.Since(start)))
	return nil
}

// tailFile returns the last n lines of a file, for error messages; reading failures are
// reported inline because the caller is already building an error.
func tailFile(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", filepath.Base(path), err)
	}
	lines := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}
