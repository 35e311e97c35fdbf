// Package ternctl is the ternctl command line: what tern does on a node, read from the maps
// the agent pinned (so the map views work while the agent is down) and from the agent's unix
// socket. cmd/ternctl is its main; tern-lab and the lab tests run the same commands.
//
// Layout: one file per command. `ternctl bpf <map> list` views live in bpf_<map>.go and are
// listed in bpfViews (bpf.go); `ternctl policy ...` commands in policy_<name>.go, listed in
// policyCommands (policy.go).
package ternctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/loader"
)

// Exit codes. Scripts can tell "the agent is down" from "the node has no datapath" from "the
// agent runs but is not ready".
const (
	ExitOK          = 0
	ExitFailure     = 1 // the command failed (reading a map, a bad answer)
	ExitUsage       = 2 // unknown command, bad flag or argument
	ExitAgentDown   = 3 // the agent's socket does not answer (a command that needs it)
	ExitNoDatapath  = 4 // no maps pinned under --pin-root (the agent never ran here, or another root)
	ExitNotReady    = 5 // status: the agent answers but is not ready
	ExitInterrupted = 130
)

// exitError carries the exit code of a failed command.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func withCode(code int, err error) error {
	if err == nil {
		return nil
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return err
	}
	return &exitError{code: code, err: err}
}

func usageErr(format string, args ...any) error {
	return &exitError{code: ExitUsage, err: fmt.Errorf(format, args...)}
}

// ExitCode maps an error returned by Execute to the process exit code.
func ExitCode(err error) int {
	if err == nil {
		return ExitOK
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	if errors.Is(err, context.Canceled) {
		return ExitInterrupted
	}
	return ExitFailure
}

// Options are the global flags.
type Options struct {
	PinRoot string
	Socket  string
	Output  string // table, json, yaml
	Timeout time.Duration
}

// env is what every command gets: the global options and where to write.
type env struct {
	opts   Options
	stdout io.Writer
	stderr io.Writer
}

func (e *env) client() *api.Client { return api.NewClient(e.opts.Socket, e.opts.Timeout) }

// agentErr makes an error of the agent's socket say what to do, with the matching exit code.
func (e *env) agentErr(what string, err error) error {
	var ae *api.Error
	if errors.As(err, &ae) && ae.Code == api.CodeTryAgainLater {
		return withCode(ExitAgentDown, fmt.Errorf("%s: %w (is tern-agent running? its socket is --socket %s)", what, err, e.opts.Socket))
	}
	return withCode(ExitFailure, fmt.Errorf("%s: %w", what, err))
}

// NewCommand builds the ternctl command tree writing to stdout and stderr.
func NewCommand(stdout, stderr io.Writer) *cobra.Command {
	e := &env{stdout: stdout, stderr: stderr}
	root := &cobra.Command{
		Use:   "ternctl",
		Short: "Inspect tern on this node: agent status, IPAM, Services and the BPF maps",
		Long: `ternctl shows what tern does on this node. Map views (bpf ...) and service list read
the maps tern-agent pinned under --pin-root, so they work while the agent is down; status,
ipam and pod filters ask the agent on its unix socket.

Exit codes: 0 ok, 1 failure, 2 usage, 3 agent not reachable, 4 no pinned datapath,
5 agent not ready (status).`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          noArgs,
		RunE:          func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
		PersistentPreRunE: func(*cobra.Command, []string) error {
			switch e.opts.Output {
			case "table", "json", "yaml":
				return nil
			}
			return usageErr("unknown output format %q: use -o table, -o json or -o yaml", e.opts.Output)
		},
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return usageErr("%w (see %s --help)", err, c.CommandPath())
	})
	pf := root.PersistentFlags()
	pf.StringVar(&e.opts.PinRoot, "pin-root", loader.DefaultPinRoot, "bpffs directory of the agent's pinned maps")
	pf.StringVar(&e.opts.Socket, "socket", api.DefaultSocketPath, "the agent's unix socket")
	pf.StringVarP(&e.opts.Output, "output", "o", "table", "output format: table, json or yaml")
	pf.DurationVar(&e.opts.Timeout, "timeout", 10*time.Second, "how long to wait for the agent's answer")
	_ = root.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]string{"table", "json", "yaml"}, cobra.ShellCompDirectiveNoFileComp))

	root.AddCommand(
		statusCommand(e),
		group("ipam", "The agent's address pool", ipamShowCommand(e)),
		group("service", "Services as the datapath serves them", serviceListCommand(e)),
		bpfCommand(e),
		policyCommand(e),
		monitorCommand(e),
	)
	return root
}

// group is a command that only holds subcommands; an unknown subcommand is a usage error
// (cobra would print help and succeed).
func group(use, short string, subs ...*cobra.Command) *cobra.Command {
	c := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				_ = cmd.Help()
				return usageErr("%s needs a subcommand", cmd.CommandPath())
			}
			return usageErr("unknown command %q for %q (see %s --help)", args[0], cmd.CommandPath(), cmd.CommandPath())
		},
	}
	c.AddCommand(subs...)
	return c
}

func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageErr("unknown command or argument %q for %q (see %s --help)", args[0], cmd.CommandPath(), cmd.CommandPath())
	}
	return nil
}

// Main runs ternctl with args and returns the exit code, reporting errors on stderr.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := NewCommand(stdout, stderr)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err != nil {
		fmt.Fprintln(stderr, "ternctl:", err)
	}
	return ExitCode(err)
}

// Run is Main on the process's arguments and standard streams.
func Run(ctx context.Context) int { return Main(ctx, os.Args[1:], os.Stdout, os.Stderr) }

// Print runs one ternctl command (args such as "service", "list") against the agent and maps
// of one node, writing to w: tern-lab prints its nodes with it.
func Print(ctx context.Context, w io.Writer, pinRoot, socket string, args ...string) error {
	root := NewCommand(w, w)
	root.SetArgs(append([]string{"--pin-root", pinRoot, "--socket", socket}, args...))
	return root.ExecuteContext(ctx)
}
