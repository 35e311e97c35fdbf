package ternctl

import (
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/tern-net/tern/policy/simulate"
)

// policySimulateCommand decides NetworkPolicy connectivity offline: the real compiler and
// the real pod programs run with BPF_PROG_TEST_RUN over private maps (needs root or
// CAP_BPF; no agent, no cluster).
func policySimulateCommand(e *env) *cobra.Command {
	var statePath, probesPath string
	c := &cobra.Command{
		Use:   "simulate -f STATE --probes PROBES",
		Short: "Decide connectivity offline with the real compiler and BPF programs",
		Long: `STATE   Kubernetes objects: a YAML multi-document file or a JSON list of v1 Namespace,
        v1 Pod (labels, spec.containers[].ports, status.podIP) and
        networking.k8s.io/v1 NetworkPolicy ("-" reads stdin)
PROBES  a JSON array of {"from": "NS/POD" or IP, "to": "NS/POD" or IP,
        "port": N, "protocol": "TCP"|"UDP"|"SCTP"}`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if statePath == "" || probesPath == "" {
				return usageErr("both -f STATE and --probes PROBES are needed")
			}
			res, err := simulateFiles(statePath, probesPath)
			if err != nil {
				return withCode(ExitFailure, err)
			}
			switch e.opts.Output {
			case "json":
				return simulate.WriteJSON(e.stdout, res)
			case "table":
				return simulate.WriteTable(e.stdout, res)
			default:
				return e.render(res, nil)
			}
		},
	}
	c.Flags().StringVarP(&statePath, "file", "f", "", "state file (YAML documents or a JSON list; - for stdin)")
	c.Flags().StringVar(&probesPath, "probes", "", "probes file (JSON array)")
	return c
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

func simulateFiles(statePath, probesPath string) ([]simulate.Result, error) {
	sf, err := openInput(statePath)
	if err != nil {
		return nil, err
	}
	st, err := simulate.ParseState(sf)
	sf.Close()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", statePath, err)
	}
	pf, err := openInput(probesPath)
	if err != nil {
		return nil, err
	}
	probes, err := simulate.ParseProbes(pf)
	pf.Close()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", probesPath, err)
	}
	sim, err := simulate.New()
	if err != nil {
		return nil, err
	}
	defer sim.Close()
	return sim.Run(st, probes)
}
