package main

import (
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/tern-net/tern/policy/simulate"
)

const policyUsage = `usage: ternctl policy simulate -f STATE -probes PROBES [-o json|table]

Decides connectivity offline with the real policy compiler and the real pod programs
(BPF_PROG_TEST_RUN over private maps; needs root or CAP_BPF, no agent, no cluster).

  STATE   Kubernetes objects: a YAML multi-document file or a JSON list of v1 Namespace,
          v1 Pod (labels, spec.containers[].ports, status.podIP) and
          networking.k8s.io/v1 NetworkPolicy ("-" reads stdin)
  PROBES  a JSON array of {"from": "NS/POD" or IP, "to": "NS/POD" or IP,
          "port": N, "protocol": "TCP"|"UDP"|"SCTP"}

flags:
`

// policyCommand runs `ternctl policy ...` with its own flags and returns the exit code. It
// is self-contained so that it moves as one piece into another command framework.
func policyCommand(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] != "simulate" {
		fmt.Fprint(stderr, policyUsage)
		return 2
	}
	fs := flag.NewFlagSet("ternctl policy simulate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	state := fs.String("f", "", "state file (YAML documents or a JSON list; - for stdin)")
	probes := fs.String("probes", "", "probes file (JSON array)")
	format := fs.String("o", "table", "output: table or json")
	fs.Usage = func() { fmt.Fprint(stderr, policyUsage); fs.PrintDefaults() }
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	if *state == "" || *probes == "" || (*format != "table" && *format != "json") || fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	if err := simulatePolicy(*state, *probes, *format, stdout); err != nil {
		fmt.Fprintln(stderr, "ternctl policy simulate:", err)
		return 1
	}
	return 0
}

func openInput(path string) (io.ReadCloser, error) {
	if path == "-" {
		return io.NopCloser(os.Stdin), nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return f, nil
}

func simulatePolicy(statePath, probesPath, format string, out io.Writer) error {
	sf, err := openInput(statePath)
	if err != nil {
		return err
	}
	st, err := simulate.ParseState(sf)
	sf.Close()
	if err != nil {
		return fmt.Errorf("%s: %w", statePath, err)
	}
	pf, err := openInput(probesPath)
	if err != nil {
		return err
	}
	probes, err := simulate.ParseProbes(pf)
	pf.Close()
	if err != nil {
		return fmt.Errorf("%s: %w", probesPath, err)
	}
	sim, err := simulate.New()
	if err != nil {
		return err
	}
	defer sim.Close()
	res, err := sim.Run(st, probes)
	if err != nil {
		return err
	}
	if format == "json" {
		return simulate.WriteJSON(out, res)
	}
	return simulate.WriteTable(out, res)
}
