package scenarios_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/scenarios"
)

// BenchmarkUpToTable measures, per built-in scenario, the time from Up to a verified
// reachability table (binaries cached, the isthmus binary built), and the memory of
// everything the run started at that moment: the PSS of the clusters' processes, the
// components' processes and this process (which hosts the node agents).
//
//	go test ./scenarios -run '^$' -bench UpToTable -benchtime 3x
func BenchmarkUpToTable(b *testing.B) {
	for _, name := range scenarios.Builtins() {
		b.Run(name, func(b *testing.B) {
			p := provider(b)
			top, err := scenarios.Builtin(name)
			if err != nil {
				b.Fatal(err)
			}
			if len(top.Faults) > 0 {
				b.Skip("a fault scenario brings up the same mesh as the scenario it is built on")
			}
			if top.MultiNetwork() && os.Geteuid() != 0 {
				b.Skip("multi-network needs root")
			}
			var (
				pss   float64
				times []float64
			)
			for b.Loop() {
				dir := b.TempDir()
				start := time.Now()
				r, err := scenarios.Up(context.Background(), top, p, scenarios.Options{Dir: dir})
				if err != nil {
					b.Fatal(err)
				}
				rep, err := r.Check(context.Background(), scenarios.CheckOptions{})
				if err != nil || !rep.Passed {
					r.Close()
					b.Fatalf("check: %v (passed %v)", err, rep != nil && rep.Passed)
				}
				times = append(times, time.Since(start).Seconds())
				pss = max(pss, runPSS(r, dir))
				r.Close()
			}
			slices.Sort(times)
			b.ReportMetric(times[len(times)/2], "s-to-table-median")
			b.ReportMetric(pss, "MB-pss-peak")
		})
	}
}

// runPSS sums the proportional set size, in MB, of the run's processes and this one.
func runPSS(r *scenarios.Run, dir string) float64 {
	pids := map[int]bool{os.Getpid(): true}
	for _, s := range processesMentioning(dir) {
		pid, _ := strconv.Atoi(s)
		pids[pid] = true
	}
	for _, g := range r.Gateways {
		pids[g.PID] = true
	}
	var kb float64
	for pid := range pids {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(bytes.NewReader(data))
		for sc.Scan() {
			if f := strings.Fields(sc.Text()); len(f) >= 2 && f[0] == "Pss:" {
				v, _ := strconv.ParseFloat(f[1], 64)
				kb += v
			}
		}
	}
	return kb / 1024
}
