package ternctl

import "github.com/spf13/cobra"

// bpfViews are the `ternctl bpf` map views, one file each (bpf_<map>.go). Adding a view of a
// new map is that file, with a func(*env) *cobra.Command returning `bpf <map>` (usually
// mapGroup around a `list`), and one line here.
func bpfViews() []func(*env) *cobra.Command {
	return []func(*env) *cobra.Command{
		bpfLBCommand,
		bpfCTCommand,
		bpfEndpointCommand,
		bpfMetricsCommand,
		bpfPolicyCommand,
		bpfNATCommand,
		bpfBandwidthCommand,
	}
}

func bpfCommand(e *env) *cobra.Command {
	c := group("bpf", "The datapath's pinned BPF maps (read directly; work while the agent is down)")
	for _, v := range bpfViews() {
		c.AddCommand(v(e))
	}
	return c
}

// mapGroup is `bpf <name>` holding its subcommands (list, get).
func mapGroup(name, short string, subs ...*cobra.Command) *cobra.Command {
	return group(name, short, subs...)
}

// listCommand is a `list` subcommand that takes no arguments.
func listCommand(short string, run func(cmd *cobra.Command) error) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: short,
		Args:  noArgs,
		RunE:  func(cmd *cobra.Command, _ []string) error { return run(cmd) },
	}
}
