package ternctl

import "github.com/spf13/cobra"

// policyCommands are the `ternctl policy` subcommands, one file each (policy_<name>.go):
// `policy simulate` goes here as policy_simulate.go with a func(*env) *cobra.Command.
func policyCommands() []func(*env) *cobra.Command {
	return []func(*env) *cobra.Command{policySimulateCommand, policyGetCommand}
}

func policyCommand(e *env) *cobra.Command {
	c := group("policy", "NetworkPolicy as the datapath enforces it")
	for _, p := range policyCommands() {
		c.AddCommand(p(e))
	}
	// Listed in help once it has a subcommand.
	c.Hidden = len(c.Commands()) == 0
	return c
}
