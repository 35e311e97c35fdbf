package ternctl

import (
	"sort"
	"strings"

	"github.com/spf13/cobra"
)

// completePods completes --pod with the pods the agent holds addresses for.
func (e *env) completePods(cmd *cobra.Command, _ []string, prefix string) ([]string, cobra.ShellCompDirective) {
	pods, err := e.podsByKey(cmd.Context())
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var out []string
	for k := range pods {
		if strings.HasPrefix(k, prefix) {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out, cobra.ShellCompDirectiveNoFileComp
}
