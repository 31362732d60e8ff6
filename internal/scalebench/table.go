package scalebench

import (
	"fmt"
	"strings"
	"time"
)

// Table formats results as a Markdown table, one row per case.
func Table(res []Result) string {
	var b strings.Builder
	b.WriteString("| clusters | endpoints | clients × subscribed | xDS | heap per cluster | heap per endpoint | heap per client | p50 | p99 | max | CPU per change | bytes sent per change | receivers |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range res {
		kind := "SotW"
		if r.Delta {
			kind = "delta"
		}
		fmt.Fprintf(&b, "| %d | %d | %d × %d | %s | %.2f MB | %.0f B | %.1f KB | %s | %s | %s | %s | %.0f KB | %d |\n",
			r.Clusters, r.Endpoints, r.Clients, r.Subscribe, kind, r.HeapPerCluster/1e6, r.HeapPerEndpoint, r.HeapPerClient/1e3,
			msec(r.P50), msec(r.P99), msec(r.Max), msec(r.CPUPerChange), r.BytesPerChange/1e3, r.Receivers)
	}
	return b.String()
}

func msec(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }
