package main

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"

	"sigs.k8s.io/yaml"
)

// printer writes a command's result in the format chosen with -o, following kubectl:
// a table by default, or json or yaml of the same data.
type printer struct {
	format string
}

func (p printer) validate() error {
	switch p.format {
	case "", "json", "yaml":
		return nil
	}
	return fmt.Errorf("unknown output format %q: use -o json, -o yaml or leave it out for a table", p.format)
}

// print writes v as json or yaml, or calls table for the tabular form.
func (p printer) print(w io.Writer, v any, table func(tw *tabwriter.Writer)) error {
	switch p.format {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	case "yaml":
		data, err := yaml.Marshal(v)
		if err != nil {
			return err
		}
		_, err = w.Write(data)
		return err
	default:
		if table == nil {
			return fmt.Errorf("this command prints only -o json or -o yaml")
		}
		tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
		table(tw)
		return tw.Flush()
	}
}
