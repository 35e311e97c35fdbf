package simulate

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
)

// WriteJSON writes results as a JSON array in probe order.
func WriteJSON(w io.Writer, results []Result) error {
	if results == nil {
		results = []Result{}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(results)
}

// WriteTable writes results as an aligned table, one probe a line.
func WriteTable(w io.Writer, results []Result) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FROM\tTO\tPORT\tVERDICT\tEGRESS\tINGRESS")
	word := func(b bool) string {
		if b {
			return "allow"
		}
		return "deny"
	}
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%s\t%d/%s\t%s\t%s\t%s\n", r.From, r.To, r.Port, r.Protocol, word(r.Allowed), word(r.Egress), word(r.Ingress))
	}
	return tw.Flush()
}
