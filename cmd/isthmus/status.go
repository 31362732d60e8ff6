package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/primary"
)

// newStatusCommand prints a running primary's /debug/clusterz: a table, or the
// primary's own JSON shape with -o json|yaml.
func newStatusCommand() *cobra.Command {
	var (
		addr string
		out  printer
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show a running primary's clusters (link state, last sync, staleness, endpoints, errors) and its authenticated proxies",
		Example: `  isthmus status --primary http://localhost:15014
  isthmus status --primary http://10.0.0.5:15014 -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			cz, err := fetchClusterz(cmd.Context(), addr)
			if err != nil {
				return err
			}
			return out.print(cmd.OutOrStdout(), cz, func(tw *tabwriter.Writer) {
				ready := "ready"
				if !cz.Ready {
					ready = "NOT READY"
				}
				fmt.Fprintf(tw, "primary in cluster %s: %s; unreachable clusters keep their endpoints for %s\n\n", cz.Cluster, ready, cz.StaleWindow)
				fmt.Fprintln(tw, "CLUSTER\tSOURCE\tSTATE\tSINCE\tLAST SYNC\tSTALE\tSERVICES\tENDPOINTS\tERROR")
				for _, s := range cz.Clusters {
					state := string(s.State)
					if s.Withdrawn {
						state += " (withdrawn)"
					}
					if s.Rotating {
						state += " (rotating)"
					}
					errText := s.Error
					if s.PendingErr != "" {
						errText = strings.TrimSpace(errText + "; new credential: " + s.PendingErr)
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", s.ID, s.Source, state, age(s.Since), ago(s.LastSync),
						dash(s.Staleness), s.Services, s.Endpoints, dash(oneLine(errText)))
				}
				if len(cz.Proxies) > 0 {
					fmt.Fprintln(tw, "\nPROXY\tKIND\tIDENTITY\tAUTH\tCLUSTER\tNETWORK\tPATH\tPEER")
					for _, p := range cz.Proxies {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.ID, p.Kind, p.Identity, p.Auth, p.Cluster, dash(string(p.Network)), p.Path, p.Peer)
					}
				}
			})
		},
	}
	cmd.Flags().StringVar(&addr, "primary", "http://localhost:15014", "HTTP address of the primary (its --http-address)")
	cmd.Flags().StringVarP(&out.format, "output", "o", "", "output format: json or yaml (default: a table)")
	return cmd
}

// fetchClusterz reads addr's /debug/clusterz (addr with or without http://) within ten
// seconds. Every failure says what to check: whether the primary runs, whether addr is
// its --http-address, or what it answered.
func fetchClusterz(ctx context.Context, addr string) (*primary.ClusterzResponse, error) {
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(addr, "/")+"/debug/clusterz", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("reach the primary at %s: %w (is `isthmus primary` running, and is --primary its --http-address?)", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("primary at %s answered %s: %s", addr, resp.Status, b)
	}
	var cz primary.ClusterzResponse
	if err := json.NewDecoder(resp.Body).Decode(&cz); err != nil {
		return nil, fmt.Errorf("primary at %s: bad /debug/clusterz: %w", addr, err)
	}
	return &cz, nil
}

// ago is age(t) + " ago", or "never" for the zero time (a cluster not yet synced).
func ago(t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return age(t) + " ago"
}

// dash shows an empty table cell as "-", so columns stay aligned and readable.
func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// oneLine fits an error into one table cell: newlines become spaces, and it is cut to
// 120 characters (-o json keeps it whole).
func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > 120 {
		s = s[:117] + "..."
	}
	return s
}
