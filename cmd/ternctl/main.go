// Command ternctl shows what tern does on a node: the service maps, the flows in
// conntrack, the datapath's counters (from the pinned maps), and the agent's IPAM state
// (from its socket). It only reads; the printing lives in internal/ternctl, which
// tern-lab shares.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/tern-net/tern/agent/api"
	"github.com/tern-net/tern/internal/ternctl"
	"github.com/tern-net/tern/loader"
)

const usage = `usage: ternctl [flags] <command>

commands:
  services   frontends (VIP:port/proto) and their backends, from the pinned maps
  flows      conntrack: client -> VIP -> backend, state and time left
  metrics    datapath counters by reason and direction
  ipam       the agent's ENIs, addresses and allocations (from its socket)
  policy simulate -f STATE -probes PROBES [-o json]
             NetworkPolicy verdicts, offline (see ternctl policy -h)

flags:
`

func main() {
	pinRoot := flag.String("pin-root", loader.DefaultPinRoot, "bpffs directory of the agent's maps")
	socket := flag.String("socket", api.DefaultSocketPath, "the agent's unix socket")
	flag.Usage = func() { fmt.Fprint(os.Stderr, usage); flag.PrintDefaults() }
	flag.Parse()
	if flag.Arg(0) == "policy" {
		os.Exit(policyCommand(flag.Args()[1:], os.Stdout, os.Stderr))
	}
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	switch flag.Arg(0) {
	case "services", "flows", "metrics", "ipam":
	default:
		flag.Usage()
		os.Exit(2)
	}
	if err := ternctl.Print(context.Background(), os.Stdout, flag.Arg(0), *pinRoot, *socket); err != nil {
		fmt.Fprintln(os.Stderr, "ternctl:", err)
		os.Exit(1)
	}
}
