package kubelocal_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
)

// Reproduce with:
//
//	go test ./internal/kubelocal -run '^$' -bench . -benchtime 5x
//
// Each iteration starts clusters from cold data directories (binaries cached) until Start
// returns, which is when the API server is ready and Pods can be created. Reported:
// median and worst time to ready, and memory per cluster 5 s after ready: RSS (counts the
// binaries' shared text once per process) and PSS (shares it between clusters, the
// honest figure when several run).

func BenchmarkStartOneCluster(b *testing.B)    { benchStart(b, 1) }
func BenchmarkStartThreeClusters(b *testing.B) { benchStart(b, 3) }

func benchStart(b *testing.B, n int) {
	set, err := kubetest.Binaries()
	if err != nil {
		b.Fatal(err)
	}
	var ready []time.Duration
	var rss, pss []float64
	for i := 0; b.Loop(); i++ {
		dir := b.TempDir()
		start := time.Now()
		clusters, err := kubelocal.StartMany(context.Background(), kubetest.Configs(set, dir, fmt.Sprintf("b%d", i), n))
		if err != nil {
			b.Fatal(err)
		}
		ready = append(ready, time.Since(start))
		b.StopTimer()
		time.Sleep(5 * time.Second) // let start-up garbage be collected before measuring
		var r, p float64
		for _, c := range clusters {
			for _, pid := range c.PIDs() {
				rr, pp := memoryOf(pid)
				r += rr
				p += pp
			}
		}
		rss = append(rss, r/float64(n))
		pss = append(pss, p/float64(n))
		for _, c := range clusters {
			c.Stop()
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(median(ready).Milliseconds()), "ms-ready-p50")
	b.ReportMetric(float64(slices.Max(ready).Milliseconds()), "ms-ready-max")
	b.ReportMetric(medianF(rss), "MB-rss/cluster")
	b.ReportMetric(medianF(pss), "MB-pss/cluster")
}

// memoryOf returns the RSS and PSS of pid in MB, from /proc/<pid>/smaps_rollup.
func memoryOf(pid int) (rss, pss float64) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/smaps_rollup")
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "Rss:":
			rss = kb / 1024
		case "Pss:":
			pss = kb / 1024
		}
	}
	return rss, pss
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func medianF(f []float64) float64 {
	s := slices.Clone(f)
	slices.Sort(s)
	return s[len(s)/2]
}
