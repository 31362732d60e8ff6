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

// validate refuses an unknown -o. Commands call it before they do anything, so a typo
// in -o never follows a change that was already made.
func (p printer) validate() error {
	switch p.format {
	case "", "json", "yaml":
		return nil
	}
	return fmt.Errorf("unknown output format %q: use -o json, -o yaml or leave it out for a table", p.format)
}

// print writes v as json or yaml, or calls table for the tabular form (a nil table means
// the command has no table: -o is then required). The json and yaml forms use v's field
// tags, so they are the stable, scriptable output; the table may change.
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
