//go:build linux

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tern-net/tern/loader"
)

// cmdDown asks the daemon to tear the lab down, waits until it is gone, then removes
// whatever a dead daemon left behind. Running it with no lab is fine.
func cmdDown(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("down", flag.ContinueOnError)
	dir := fs.String("dir", defaultDir, "lab directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	st, stErr := readState(*dir)
	if _, err := os.Stat(*dir); os.IsNotExist(err) {
		fmt.Printf("no lab in %s: nothing to tear down\n", *dir)
		return nil
	}
	began := time.Now()
	// Teardown of agents and the control plane takes seconds; give it room.
	c := newClient(*dir, 2*time.Minute)
	err := c.do(ctx, "POST", "/v1/down", nil, nil)
	switch {
	case err == nil:
		fmt.Println("the lab daemon tore the lab down")
	case errors.Is(err, errNoDaemon):
		fmt.Println("no lab daemon answers; removing what is left")
	default:
		// The daemon answered but the teardown had errors: report them, still clean up.
		fmt.Fprintf(os.Stderr, "tern-lab: the daemon's teardown reported: %v\n", err)
	}
	if stErr == nil && st.PID > 0 {
		deadline := time.Now().Add(time.Minute)
		for alive(st.PID) {
			if time.Now().After(deadline) {
				fmt.Printf("the daemon (pid %d) is still running after 1m: killing it\n", st.PID)
				_ = syscall.Kill(st.PID, syscall.SIGKILL)
				time.Sleep(200 * time.Millisecond)
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if err := cleanLeftovers(*dir); err != nil {
		return err
	}
	fmt.Printf("lab in %s is gone (%s)\n", *dir, time.Since(began).Round(100*time.Millisecond))
	return nil
}

// cleanLeftovers removes what a lab in dir may have left after its daemon died without
// tearing down: processes started for it (they carry the lab directory in their command
// line; they normally die with the daemon by their parent-death signal), the bpffs pins
// recorded in the state file (network namespaces are anonymous and died with the daemon),
// and the directory itself.
func cleanLeftovers(dir string) error {
	var errs []error
	st, err := readState(dir)
	if err != nil && !os.IsNotExist(err) {
		errs = append(errs, err)
	}
	if st != nil && alive(st.PID) {
		return fmt.Errorf("the lab daemon (pid %d) is still running: run `tern-lab down -dir %s`", st.PID, dir)
	}
	for _, pid := range processesUsing(dir) {
		fmt.Printf("killing leftover process %d (%s)\n", pid, cmdline(pid))
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("kill leftover process %d: %w", pid, err))
		}
	}
	if st != nil && st.PinRoot != "" {
		if _, err := os.Stat(st.PinRoot); err == nil {
			fmt.Printf("removing leftover pins %s\n", st.PinRoot)
			if err := loader.RemovePins(st.PinRoot); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if st != nil && st.Cgroup != "" {
		if err := removeCgroups(st.Cgroup); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
	}
	return errors.Join(errs...)
}

// removeCgroups removes the lab's socket-LB cgroup and its nodes' (empty once the lab's
// processes are gone; cgroup directories go by rmdir, children first).
func removeCgroups(cg string) error {
	ents, err := os.ReadDir(cg)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read leftover cgroup %s: %w", cg, err)
	}
	fmt.Printf("removing leftover cgroup %s\n", cg)
	var errs []error
	for _, e := range ents {
		if e.IsDir() {
			if err := os.Remove(filepath.Join(cg, e.Name())); err != nil {
				errs = append(errs, fmt.Errorf("remove leftover cgroup: %w", err))
			}
		}
	}
	if err := os.Remove(cg); err != nil {
		errs = append(errs, fmt.Errorf("remove leftover cgroup: %w", err))
	}
	return errors.Join(errs...)
}

// processesUsing lists the lab's own kinds of process (agents, control plane) whose command
// line names a path inside dir's lab directory (the agents' -config, the control plane's data
// directory). A shell tailing a log there is not one of them.
func processesUsing(dir string) []int {
	dir = filepath.Join(filepath.Clean(dir), labSubdir) + "/"
	kinds := map[string]bool{"tern-agent": true, "etcd": true, "kube-apiserver": true, "kube-controller-manager": true}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		args := strings.Fields(cmdline(pid))
		if len(args) > 0 && kinds[filepath.Base(args[0])] && strings.Contains(strings.Join(args, " "), dir) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func cmdline(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
}
